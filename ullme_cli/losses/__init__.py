"""Training losses, one per file; each docstring states its formula, inputs and reference."""

from ullme_cli.losses.contrastive import InfoNCELoss
from ullme_cli.losses.grl import GRLLoss
from ullme_cli.losses.kl import RelevanceKLLoss
from ullme_cli.losses.mntp import MNTPLoss, mask_tokens
from ullme_cli.losses.preference import DPOLoss
from ullme_cli.losses.sft import SFTLoss
from ullme_cli.losses.simcse import SimCSELoss

__all__ = ["InfoNCELoss", "GRLLoss", "RelevanceKLLoss", "MNTPLoss", "mask_tokens", "DPOLoss", "SFTLoss", "SimCSELoss"]
