"""Training losses, one per file; each docstring states its formula, inputs and reference.

GRL (L = λ_CL·L_CL + λ_DPO·L_DPO + λ_KL·KL(P_rt ‖ P_gen), ULLME) is not a module of its own: it is the
weighted sum that `training/step.py` assembles from InfoNCE, DPO and the KL, under the component names
`contrastive`, `dpo` and `kl` that recipes use (`loss.strategy: grl` sets the paper's λ = 1, 0.5, 1).

Which components exist, what each needs and which recipe parameters it reads: `losses/table.py`.
The classes are imported on first use, so that the table (read by recipe validation) does not load torch.
"""

import importlib

_WHERE = {
    "InfoNCELoss": "contrastive", "DistillationLoss": "distillation", "RelevanceKLLoss": "kl", "MatryoshkaLoss": "matryoshka",
    "MNTPLoss": "mntp", "mask_tokens": "mntp", "DPOLoss": "preference", "SFTLoss": "sft", "SimCSELoss": "simcse",
}  # fmt: skip
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"ullme_cli.losses.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ullme_cli.losses' has no attribute {name!r}")
