"""Recommender top-K: score every item for a user, leave out what they rated in training.

Unknown users get the most-rated items (or a 404, by config), so a cold start still answers.
"""

from __future__ import annotations

import numpy as np

from aidc.errors import RequestError


class TopK:
    def __init__(self, loaded, train: dict[str, np.ndarray], unknown_users: str = "popular"):
        if loaded.spec["task"] != "recommendation":
            raise RequestError(f"model {loaded.name!r} is a {loaded.spec['task']} model; top-K needs a "
                               "recommendation model", status=404)
        self.loaded, self.unknown_users = loaded, unknown_users
        state = loaded.spec["transform"]
        self.items = np.asarray(state["items"])  # model item index j (>= 1) is items[j - 1]
        self.users = {int(u) for u in state["users"]}
        users, items = np.asarray(train["user"]), np.asarray(train["item"])
        order = np.argsort(users, kind="stable")
        bounds = np.flatnonzero(np.diff(users[order])) + 1
        self.rated = {int(g[0]): set(items[order][s].tolist()) for g, s in
                      zip(np.split(users[order], bounds), np.split(np.arange(len(users)), bounds))}
        ids, counts = np.unique(items, return_counts=True)
        self.popular = ids[np.argsort(-counts, kind="stable")]

    def top(self, user: int, k: int) -> dict:
        if user not in self.users:
            if self.unknown_users == "404":
                raise RequestError(f"user {user} is unknown to model {self.loaded.name!r} version "
                                   f"{self.loaded.version}; known users come from its training data", status=404,
                                   field="user")
            return {"user": user, "known_user": False, "strategy": "popular",
                    "items": [{"item": int(i), "score": None} for i in self.popular[:k]]}
        scores = self.loaded.infer_tensors({"user": np.full(len(self.items), user, np.int64),
                                            "item": self.items.astype(np.int64)})["rating"]
        rated = self.rated.get(user, set())
        keep = np.array([int(i) not in rated for i in self.items], dtype=bool)
        idx = np.flatnonzero(keep)
        best = idx[np.argsort(-scores[idx], kind="stable")[:k]]
        return {"user": user, "known_user": True, "strategy": "model",
                "items": [{"item": int(self.items[j]), "score": round(float(scores[j]), 4)} for j in best]}


__all__ = ["TopK"]
