"""Toy contextual bandits for the policy tests: the best arm depends on the context (the domain)."""
import json

import torch

ARMS = ["none", "lookup@2", "lookup@7", "exit@10", "exit@20", "model:tiny"]
DOMAINS = ["qa", "math", "translation"]
BEST_ARM = {"qa": "lookup@7", "math": "exit@20", "translation": "exit@10"}


def toy_rows(num_rows: int = 210, feature_dim: int = 24, seed: int = 0) -> list[dict]:
    """Three domains, each a cluster in feature space and in vocabulary, each with its own best arm.
    `exit@20` is decent everywhere, so it is the best single arm; a good policy beats it by far."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(len(DOMAINS), feature_dim, generator=g)
    rows = []
    for i in range(num_rows):
        c = i % len(DOMAINS)
        domain = DOMAINS[c]
        rewards = {arm: 1.0 + 0.2 * torch.rand((), generator=g).item() for arm in ARMS}
        rewards["none"] = 1.0
        rewards["exit@20"] += 0.35
        rewards[BEST_ARM[domain]] += 0.8 if BEST_ARM[domain] != "exit@20" else 0.45
        num_tokens = int(torch.randint(5, 40, (), generator=g))
        # Each domain draws mostly from its own id range (large ids, so hashing matters), plus shared filler.
        own = (40_000 + 500 * c + torch.randint(0, 50, (num_tokens,), generator=g)).tolist()
        filler = torch.randint(0, 100, (num_tokens // 2,), generator=g).tolist()
        hidden = centers[c] + torch.randn(feature_dim, generator=g)
        rows.append({
            "id": f"{domain}-{i}",
            "domain": domain,
            "prompt_len": num_tokens + len(filler),
            "features": {"hidden": hidden.tolist() + [float(torch.log(torch.tensor(num_tokens + len(filler))))],
                         "tokens": own + filler},
            "arms": {arm: {"speedup": r, "accepted_per_forward": 2.0} for arm, r in rewards.items()},
        })
    return rows


def write_rows(tmp_path, rows):
    path = tmp_path / "rewards.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
