from torch import nn

from ullme_cli.losses.contrastive import InfoNCELoss
from ullme_cli.losses.kl import RelevanceKLLoss, candidate_scores
from ullme_cli.losses.preference import DPOLoss


class GRLLoss(nn.Module):
    """Generation-augmented representation learning (ULLME; Man et al., 2024).

        L = λ_CL · L_CL + λ_DPO · L_DPO + λ_KL · KL(P_rt ‖ P_gen)

    L_CL is InfoNCE over in-batch and hard negatives; L_DPO prefers each positive over its first hard
    negative as a generation; the KL ties the embedding's relevance distribution over U(q) to the
    generation likelihood's. Defaults: λ = (1.0, 0.5, 1.0), τ = 0.05, τ_kl = 0.1, τ_gen = 1.0, β = 0.1.

    Inputs: queries (B, d), positives (B, d), negatives (B, n, d); generation log-prob means (B, 1+n)
    and sums (B, 1+n) over [positive, negatives]; reference sums (B, 1+n) or None.
    Returns (total, {"cl": ..., "dpo": ..., "kl": ...}).
    """

    def __init__(self, lambda_cl=1.0, lambda_dpo=0.5, lambda_kl=1.0, temperature=0.05, tau_kl=0.1, tau_gen=1.0,
                 kl_direction="rt||gen", beta=0.1, dpo_variant="sigmoid", reference_free=False):  # fmt: skip
        super().__init__()
        self.lambdas = {"cl": lambda_cl, "dpo": lambda_dpo, "kl": lambda_kl}
        self.contrastive = InfoNCELoss(temperature)
        self.kl = RelevanceKLLoss(tau_kl, tau_gen, kl_direction)
        self.dpo = DPOLoss(beta, dpo_variant, reference_free)

    def forward(self, queries, positives, negatives, generation_means, generation_sums, reference_sums=None):
        flat_negatives = negatives.reshape(-1, negatives.shape[-1])
        retrieval_scores = candidate_scores(queries, positives, negatives)
        ref_chosen = ref_rejected = None
        if reference_sums is not None:
            ref_chosen, ref_rejected = reference_sums[:, 0], reference_sums[:, 1]
        parts = {
            "cl": self.contrastive(queries, positives, flat_negatives),
            "dpo": self.dpo(generation_sums[:, 0], generation_sums[:, 1], ref_chosen, ref_rejected),
            "kl": self.kl(retrieval_scores, generation_means),
        }
        total = sum(self.lambdas[name] * value for name, value in parts.items())
        return total, parts
