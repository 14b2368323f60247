"""The language-model wing: OpenAI-compatible serving on vLLM through Ray Serve LLM.

app.py  the `llm` app's arguments, the engine deployment (a verified registry version as the folder vLLM
        loads), the ingress with aidc's routes, auth and errors, and multi-LoRA adapters of one base;
        serve_apps/llm.py is its shell
"""
