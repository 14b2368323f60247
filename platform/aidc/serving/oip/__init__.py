"""The Open Inference Protocol (KServe v2) wing: tensor models over REST (/v2) and gRPC.

protocol.py  the v2 schemas, REST bodies (JSON and Triton binary tensors), input/output checks
plane.py     the data plane: routes by model name/version (alias, pinned versions, canary), batches, infers
app.py       the `tensors` app's arguments and replica classes (a served version, a local handle, multiplexed
             models) and its gRPC servicer methods; serve_apps/tensors.py binds them into Serve
topk.py      top-K items for recommenders
The gRPC stubs live in aidc.serving.oip_grpc (the path Serve configs name in grpc_servicer_functions).
"""
