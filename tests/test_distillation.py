"""Teacher scores and Matryoshka (docs/design.md §4): the two losses by hand, teacher scores aligned with the
drawn candidates, `mine --teacher` (an ullme teacher and a sentence-transformers one), and a finetune that
records its trained sizes, which `encode --truncate-dim` then checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import demo_texts, run_cli, write_corpus

from ullme_cli.data import TrainingExample
from ullme_cli.losses import DistillationLoss, InfoNCELoss, MatryoshkaLoss


def test_distillation_is_the_kl_of_the_teacher_to_the_student_over_scored_candidates():
    student = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.5]])
    teacher = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.6, 0.4]])
    scored = torch.tensor([[True, True, False], [True, True, True]])
    loss = DistillationLoss(temperature=0.1, teacher_temperature=0.5)(student, teacher, scored)

    def kl(s, t):
        p_t = [math.exp(x / 0.5) for x in t]
        p_t = [x / sum(p_t) for x in p_t]
        p_s = [math.exp(x / 0.1) for x in s]
        p_s = [x / sum(p_s) for x in p_s]
        return sum(a * math.log(a / b) for a, b in zip(p_t, p_s))

    expected = (kl([0.9, 0.1], [0.8, 0.2]) + kl([0.2, 0.8, 0.5], [0.1, 0.6, 0.4])) / 2  # the unscored candidate leaves both softmaxes
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    nothing = DistillationLoss()(student.requires_grad_(), torch.zeros_like(student), torch.zeros_like(student, dtype=torch.bool))
    assert nothing.item() == 0 and nothing.requires_grad


def test_distillation_stays_finite_for_the_largest_finite_teacher_scores():
    """design.md §4: scores of ±1e308 over τ_t 0.05 overflow a plain softmax to NaN; the loss shifts each
    row by its largest score first, so the teacher puts all its mass on the top candidate."""
    student = torch.tensor([[0.9, 0.1, 0.3]], requires_grad=True)
    scored = torch.ones(1, 3, dtype=torch.bool)
    loss = DistillationLoss(temperature=0.1, teacher_temperature=0.05)(student, torch.tensor([[1e308, -1e308, 0.0]], dtype=torch.float64), scored)
    loss.backward()
    log_s = torch.log_softmax(torch.tensor([0.9, 0.1, 0.3]) / 0.1, -1)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-log_s[0].item(), rel=1e-5)
    assert torch.isfinite(student.grad).all()


def test_matryoshka_is_the_weighted_sum_over_renormalised_prefixes():
    torch.manual_seed(0)
    q, p, n = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(4, 2, 16), dim=-1)
    info_nce = InfoNCELoss(0.05, gather=False)
    inner = lambda q, p, n: info_nce(q, p, n.reshape(-1, n.shape[-1]))  # noqa: E731
    got = MatryoshkaLoss([4, 8, None], [0.5, 1.0, 2.0])(inner, q, p, n)
    cut = lambda x, d: F.normalize(x[..., :d], dim=-1)  # noqa: E731
    expected = 0.5 * inner(cut(q, 4), cut(p, 4), cut(n, 4)) + 1.0 * inner(cut(q, 8), cut(p, 8), cut(n, 8)) + 2.0 * inner(q, p, n)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_scores_follow_the_drawn_candidates_and_borrowed_ones_have_none(tiny_llama):
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    step = StepLoss(Embedder.load(str(tiny_llama), dtype="float32", device="cpu"), LossSection(weights={"distill": 1.0}), negatives_per_query=2)
    rows = [TrainingExample("q0", ["a", "b"], ["x", "y", "z"], extra={"pos_scores": [0.9, 0.8], "neg_scores": [0.1, 0.2, 0.3]}),
            TrainingExample("q1", ["c"], [], extra={"pos_scores": [0.7]})]  # fmt: skip
    positives, negatives = step.candidates(rows, torch.Generator().manual_seed(3))
    scores, scored = step.teacher_scores(rows, positives, negatives)
    table = {"a": 0.9, "b": 0.8, "x": 0.1, "y": 0.2, "z": 0.3}
    assert scores[0].tolist() == pytest.approx([table[positives[0]]] + [table[t] for t in negatives[0]])
    assert scored[0].all() and scores[1, 0].item() == pytest.approx(0.7)
    assert scored[1, 0] and not scored[1, 1:].any(), "q1 borrowed q0's positive: no teacher score"
    with pytest.raises(Exception, match="matryoshka_dims: 64 is above the model's 32"):
        StepLoss(step.embedder, LossSection(matryoshka_dims=[16, 64]), 1)


def cosine_scores(encode_query, encode_passage, rows):
    return [([float(encode_query(r["query"]) @ encode_passage(t)) for t in r["positive"]],
             [float(encode_query(r["query"]) @ encode_passage(t)) for t in r["negative"]]) for r in rows]  # fmt: skip


def test_mine_teacher_then_a_matryoshka_distill_run_records_its_sizes(tiny_llama, tmp_path):
    import yaml

    from ullme_cli.models.embedder import Embedder

    texts = demo_texts(60)
    corpus = write_corpus(tmp_path / "corpus.jsonl", texts)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"query": texts[i], "positive": [texts[i + 1]], "negative": [texts[59]], "neg_scores": [1.0]}) + "\n" for i in range(0, 20, 2)))
    mined = run_cli("mine", tmp_path / "train.jsonl", "--corpus", corpus, "-o", tmp_path / "mined.jsonl", "-m", tiny_llama, "--negatives", "3",
                    "--range", "0:", "--teacher", tiny_llama, "--dtype", "float32", "-q")  # fmt: skip
    assert mined.returncode == 0, mined.stderr.decode()
    rows = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    teacher = Embedder.load(str(tiny_llama), dtype="float32", device="cpu")
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    expected = cosine_scores(lambda t: unit(teacher.encode([t], kind="query")[0]), lambda t: unit(teacher.encode([t])[0]), rows)
    for row, (pos, neg) in zip(rows, expected):
        assert len(row["neg_scores"]) == len(row["negative"]) == 3
        np.testing.assert_allclose(row["pos_scores"], pos, atol=2e-5)
        np.testing.assert_allclose(row["neg_scores"], neg, atol=2e-5)

    recipe = {"output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_llama), "max_length": 64},
              "data": {"train": str(tmp_path / "mined.jsonl"), "negatives_per_query": 2},
              "loss": {"weights": {"contrastive": 1.0, "distill": 1.0}, "matryoshka_dims": [16, "full"]},
              "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trained = run_cli("finetune", tmp_path / "recipe.yaml", "-q")
    assert trained.returncode == 0, trained.stderr.decode()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["distill"] >= 0 and "contrastive" in m for m in metrics if "loss" in m)
    model = tmp_path / "run" / "model"
    assert json.loads((model / "ullme.json").read_text())["matryoshka_dims"] == [16, None]
    assert "trained with Matryoshka at 16, full dimensions" in (model / "README.md").read_text()
    trained_size = run_cli("encode", corpus, "-o", tmp_path / "e16.npy", "-m", model, "--truncate-dim", "16")
    untrained = run_cli("encode", corpus, "-o", tmp_path / "e8.npy", "-m", model, "--truncate-dim", "8")
    assert trained_size.returncode == 0 and "--truncate-dim" not in trained_size.stderr.decode()
    assert untrained.returncode == 0 and "trained to work at 16, full dimensions, not 8" in untrained.stderr.decode()


def test_a_sentence_transformers_teacher_scores_with_its_own_prompts(tiny_llama, tmp_path):
    import shutil

    from sentence_transformers import SentenceTransformer

    from ullme_cli.model_setup import Runtime
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.retrieval.mine import score_with_teacher

    folder = Embedder.load(str(tiny_llama), dtype="float32", device="cpu", query_instruction="Find the answer",
                           instruction_template="Instruct: {instruction}\nQuery:\n").save(tmp_path / "stock")  # a template that keeps the stock route
    (folder / "ullme.json").unlink()  # now a plain sentence-transformers folder, which ullme does not load as its own
    shutil.rmtree(folder / ".ullme-files", ignore_errors=True)
    texts = demo_texts(8)
    rows = [TrainingExample(texts[0], [texts[1]], [texts[2], texts[3]]), TrainingExample(texts[4], [texts[5]], [texts[6]])]
    score_with_teacher(rows, str(folder), Runtime(device="cpu"), show_progress=False)
    st = SentenceTransformer(str(folder), device="cpu")
    query = lambda t: st.encode([t], prompt_name="query", normalize_embeddings=True)[0]  # noqa: E731
    passage = lambda t: st.encode([t], prompt_name="document", normalize_embeddings=True)[0]  # noqa: E731
    for row, (pos, neg) in zip(rows, cosine_scores(query, passage, [ex.to_json() for ex in rows])):
        np.testing.assert_allclose(row.extra["pos_scores"], pos, atol=2e-5)
        np.testing.assert_allclose(row.extra["neg_scores"], neg, atol=2e-5)
