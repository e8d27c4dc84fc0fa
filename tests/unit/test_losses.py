"""Each loss against a computation written out by hand on small fixed tensors."""

import json
import math

import pytest
import torch

from ullme_cli.losses import (
    DPOLoss,
    InfoNCELoss,
    MNTPLoss,
    RelevanceKLLoss,
    SFTLoss,
    SimCSELoss,
    mask_tokens,
)
from ullme_cli.models import generation

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
N = torch.tensor([[-1.0, 0.0]])


def softmax_nll(scores: list[float], target: int) -> float:
    return -(scores[target] - math.log(sum(math.exp(s) for s in scores)))


def test_info_nce_with_in_batch_and_hard_negatives():
    tau = 0.5
    expected = (
        softmax_nll([0.6 / tau, 0.8 / tau, -1.0 / tau], 0) + softmax_nll([0.8 / tau, 0.6 / tau, 0.0 / tau], 1)
    ) / 2
    assert InfoNCELoss(tau)(Q, P, N).item() == pytest.approx(expected, rel=1e-6)
    no_hard = (softmax_nll([0.6 / tau, 0.8 / tau], 0) + softmax_nll([0.8 / tau, 0.6 / tau], 1)) / 2
    assert InfoNCELoss(tau)(Q, P).item() == pytest.approx(no_hard, rel=1e-6)


def test_simcse_is_info_nce_between_two_views():
    assert SimCSELoss(0.5)(Q, P).item() == pytest.approx(InfoNCELoss(0.5)(Q, P).item())


def test_kl_in_both_directions():
    s = torch.tensor([[0.9, 0.1, 0.3]])
    g = torch.tensor([[-1.0, -2.0, -1.5]])
    p_rt = torch.softmax(s / 0.1, -1)[0].tolist()
    p_gen = torch.softmax(g / 1.0, -1)[0].tolist()
    rt_gen = sum(a * math.log(a / b) for a, b in zip(p_rt, p_gen))
    gen_rt = sum(b * math.log(b / a) for a, b in zip(p_rt, p_gen))
    assert RelevanceKLLoss(0.1, 1.0, "rt||gen")(s, g).item() == pytest.approx(rt_gen, rel=1e-5)
    assert RelevanceKLLoss(0.1, 1.0, "gen||rt")(s, g).item() == pytest.approx(gen_rt, rel=1e-5)
    assert rt_gen != pytest.approx(gen_rt)


def test_kl_treats_generation_as_a_detached_teacher():
    s = torch.tensor([[0.9, 0.1]], requires_grad=True)
    g = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    RelevanceKLLoss()(s, g).backward()
    assert s.grad is not None and g.grad is None


@pytest.mark.parametrize("variant", ["sigmoid", "hinge", "ipo"])
def test_dpo_with_and_without_reference(variant):
    beta = 0.1
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-14.0]), torch.tensor([-11.0]), torch.tensor([-12.0])
    with_ref = (-10 - -14) - (-11 - -12)  # 3
    free = -10 - -14  # 4
    formula = {
        "sigmoid": lambda h: -math.log(1 / (1 + math.exp(-beta * h))),
        "hinge": lambda h: max(0.0, 1 - beta * h),
        "ipo": lambda h: (h - 1 / (2 * beta)) ** 2,
    }[variant]
    assert DPOLoss(beta, variant)(pc, pr, rc, rr).item() == pytest.approx(formula(with_ref), rel=1e-5)
    assert DPOLoss(beta, variant, reference_free=True)(pc, pr).item() == pytest.approx(formula(free), rel=1e-5)


def test_sft_is_token_weighted_negative_log_likelihood():
    assert SFTLoss()(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item() == pytest.approx(8 / 4)


def test_mntp_predicts_masked_tokens_from_the_previous_position():
    ids = torch.tensor([[5, 6, 7, 8]])
    masked, labels = mask_tokens(ids, torch.ones_like(ids), mask_token_id=0, probability=1.0)
    assert masked.tolist() == [[5, 0, 0, 0]] and labels.tolist() == [[-100, 6, 7, 8]]
    logits = torch.zeros(1, 4, 10)
    logits[0, 0, 6] = logits[0, 1, 7] = logits[0, 2, 8] = 2.0
    expected = -math.log(math.exp(2) / (math.exp(2) + 9))
    assert MNTPLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_mntp_masks_one_token_where_the_draw_masks_none():
    """Short texts in a small batch can draw no masked position; the loss would be 0/0 (NaN) and stop training
    (a recipe's max_length may be as low as a setup's). One position is masked then; a draw with any keeps it."""
    ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    masked, labels = mask_tokens(ids, mask, mask_token_id=0, probability=0.0)
    assert labels.tolist() == [[-100, 6, -100], [-100, -100, -100]] and masked.tolist() == [[5, 0, 0], [7, 8, 9]]
    assert torch.isfinite(MNTPLoss()(torch.randn(2, 3, 10), labels))
    drawn = mask_tokens(ids, mask, mask_token_id=0, probability=1.0)[1]
    assert drawn.tolist() == [[-100, 6, -100], [-100, 8, 9]]


def test_grl_terms_are_the_ones_training_assembles():
    """StepLoss (what `finetune` runs) builds GRL's parts under one set of names, with the paper's λ."""
    from ullme_cli.losses.step_inputs import StepInputs
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    negatives = N.expand(2, 1, 2)
    means = torch.tensor([[-1.0, -2.0], [-1.5, -1.0]])
    sums = torch.tensor([[-5.0, -9.0], [-7.0, -4.0]])
    step = StepLoss(None, LossSection(strategy="grl", temperature=0.5, reference_free=True), negatives_per_query=1)
    assert step.weights == {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0}
    inputs = StepInputs(queries=Q, positives=P, negatives=negatives, generation={"sum": sums, "mean": means})
    parts = step.phase_terms("embeddings", inputs)
    parts.update(step.phase_terms("generation", inputs))
    cl = InfoNCELoss(0.5)(Q, P, torch.cat([N, N]))
    dpo = DPOLoss(0.1, reference_free=True)(sums[:, 0], sums[:, 1])
    scores = torch.stack([(Q * P).sum(1), (Q * N).sum(1)], dim=1)
    kl = RelevanceKLLoss(0.1, 1.0)(scores, means)
    assert set(parts) == {"contrastive", "dpo", "kl"}
    assert parts["contrastive"].item() == pytest.approx(cl.item()) and parts["dpo"].item() == pytest.approx(dpo.item())
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)


def test_ipo_scores_token_means_and_sigmoid_sums_unless_told():
    from ullme_cli.losses.step_inputs import StepInputs
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    means, sums = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-5.0, -9.0]])
    generation = {"sum": sums, "mean": means}
    for variant, logprob, expected in [("ipo", "auto", means), ("sigmoid", "auto", sums), ("ipo", "sum", sums), ("sigmoid", "mean", means)]:
        loss = LossSection(strategy="dpo", dpo_variant=variant, dpo_logprob=logprob, reference_free=True)
        part = StepLoss(None, loss, negatives_per_query=1).phase_terms("generation", StepInputs(generation=generation))["dpo"]
        assert part.item() == pytest.approx(DPOLoss(0.1, variant, True)(expected[:, 0], expected[:, 1]).item())


def test_a_rows_generation_instruction_prompts_its_generation_terms(tiny_llama, tmp_path):
    """A multi-task set prompts each task its own way: a row's generation_instruction wins over the model's.
    Training builds the documented prompt, separator included (it used to leave `generation_separator` out,
    and scored other log-probs than `Embedder.generation_prompt` documents)."""
    import ullme_cli as ullme
    from ullme_cli.data import read_training_examples
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "a man plays", "positive": "a man performs", "generation_instruction": "Paraphrase: "}\n'
                    '{"query": "who won?", "positive": "Bob won."}\n')  # fmt: skip
    examples, _ = read_training_examples(str(rows))
    assert examples[0].to_json()["generation_instruction"] == "Paraphrase: " and "generation_instruction" not in examples[1].to_json()
    embedder = ullme.load(str(tiny_llama), dtype="float32", generation_instruction="Answer: ")
    step = StepLoss(embedder, LossSection(strategy="grl", reference_free=True), negatives_per_query=1)
    assert embedder.setup.generation_separator == "\n"
    assert step.prompts(examples) == ["Paraphrase: a man plays\n", "Answer: who won?\n"]
    assert step.prompts(examples)[1] == generation.generation_prompt(embedder, "who won?")
    assert generation.generation_prompt(ullme.load(str(tiny_llama), dtype="float32", generation_separator=""), "who won?", "Q: ") == "Q: who won?"


def test_conservative_dpo_matches_its_formula_by_hand():
    """-(1-ε) log σ(βh) - ε log σ(-βh), h the policy-minus-reference margin; ε = 0 is plain DPO."""
    import math

    from ullme_cli.losses import DPOLoss

    pc, pr, rc, rr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5]), torch.tensor([-3.5, -1.2]), torch.tensor([-3.8, -0.9])
    h = [(a - b) - (c - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    for eps in (0.0, 0.1):
        expected = sum(-(1 - eps) * logsig(0.1 * m) - eps * logsig(-0.1 * m) for m in h) / len(h)
        assert DPOLoss(0.1, label_smoothing=eps)(pc, pr, rc, rr).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        DPOLoss(0.1, label_smoothing=0.5)


def test_rows_of_one_label_are_not_each_others_negatives():
    """SupCon-style masking, by hand: row 0 and row 1 share a label, so p1 leaves row 0's denominator (and
    p0 row 1's); row 2 has none of its own group; hard negatives always stay."""
    import numpy as np

    torch.manual_seed(0)
    q, p, neg = (torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for n in (3, 3, 2))
    groups = torch.tensor([7, 7, -1])
    tau = 0.05
    s = lambda a, b: float(a @ b) / tau  # noqa: E731
    candidates = {0: [0, 2], 1: [1, 2], 2: [0, 1, 2]}  # positives each row keeps (its own first)
    expected = np.mean([-(s(q[i], p[i]) - np.log(sum(np.exp(s(q[i], p[j])) for j in candidates[i]) + sum(np.exp(s(q[i], n)) for n in neg)))
                        for i in range(3)])  # fmt: skip
    assert InfoNCELoss(tau)(q, p, neg, groups).item() == pytest.approx(expected, rel=1e-5)
    assert InfoNCELoss(tau)(q, p, neg, torch.tensor([-1, -1, -1])).item() == pytest.approx(InfoNCELoss(tau)(q, p, neg).item(), rel=1e-6)


def test_a_rows_label_groups_its_batch_and_gradcache_agrees(tiny_llama, tmp_path):
    import ullme_cli as ullme
    from ullme_cli.data import read_training_examples
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "cheap flights to rome", "positive": "travel", "negative": "sports", "label": "travel"},
        {"query": "hotel deals in paris", "positive": "travel", "negative": "sports", "label": "travel"},
        {"query": "who won the cup final", "positive": "sports", "negative": "travel", "label": "sports"},
        {"query": "what is a qubit", "positive": "A qubit is a two-state quantum system.", "negative": "sports"},
    ]))  # fmt: skip
    examples, _ = read_training_examples(str(rows))
    embedder = ullme.load(str(tiny_llama), dtype="float32")
    step = StepLoss(embedder, LossSection(strategy="contrastive"), negatives_per_query=1)
    groups = step.groups(examples).tolist()
    assert groups[0] == groups[1] != groups[2] and groups[3] == -1
    losses = []
    for chunk in (0, 2):  # the plain step and GradCache give the same masked loss
        embedder.model.zero_grad()
        step = StepLoss(embedder, LossSection(strategy="contrastive"), negatives_per_query=1, chunk_size=chunk)
        losses.append(step.backward(examples, torch.Generator().manual_seed(0))[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
