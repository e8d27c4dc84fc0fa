"""Training losses, one per file; each docstring states its formula, inputs and reference.

GRL (L = λ_CL·L_CL + λ_DPO·L_DPO + λ_KL·KL(P_rt ‖ P_gen), ULLME) is not a module of its own: it is the
weighted sum that `training/step.py` assembles from InfoNCE, DPO and the KL, under the component names
`contrastive`, `dpo` and `kl` that recipes use (`loss.strategy: grl` sets the paper's λ = 1, 0.5, 1).
"""

from ullme_cli.losses.contrastive import InfoNCELoss
from ullme_cli.losses.distillation import DistillationLoss
from ullme_cli.losses.kl import RelevanceKLLoss
from ullme_cli.losses.matryoshka import MatryoshkaLoss
from ullme_cli.losses.mntp import MNTPLoss, mask_tokens
from ullme_cli.losses.preference import DPOLoss
from ullme_cli.losses.sft import SFTLoss
from ullme_cli.losses.simcse import SimCSELoss

__all__ = ["InfoNCELoss", "DistillationLoss", "MatryoshkaLoss", "RelevanceKLLoss", "MNTPLoss", "mask_tokens", "DPOLoss", "SFTLoss", "SimCSELoss"]
