"""curves.png and `ullme plot`: loss components and eval metrics over steps, for one or several runs."""

import json

from conftest import run_cli

from ullme_cli.training.curves import panel_order, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, shift: float, torn: bool = False):
    """A metrics.jsonl as finetune writes it (the numbers are made up; the plot reads any)."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 2 - s * shift, "contrastive": 1.5 - s * shift, "kl": 0.5, "lr": 1e-4,
                         "grad_norm": 1.0, "steps_per_s": 3.0, **({"eval_ndcg_at_10": 0.1 * s} if s % 2 == 0 else {})})
             for s in range(1, 7)]  # fmt: skip
    (folder / "metrics.jsonl").write_text("\n".join(lines) + ("\n{\"step\": 7, \"lo" if torn else "\n"))
    return folder


def test_panels_are_loss_then_components_then_eval_then_optimizer():
    assert panel_order({"lr", "eval_ndcg_at_10", "kl", "loss", "contrastive", "grad_norm"}) == [
        "loss", "contrastive", "kl", "eval_ndcg_at_10", "lr", "grad_norm"]  # fmt: skip


def test_a_torn_last_line_of_a_killed_run_is_skipped(tmp_path):
    assert [r["step"] for r in read_metrics(fake_run(tmp_path / "a", 0.1, torn=True))] == [1, 2, 3, 4, 5, 6]


def test_plot_draws_several_runs_and_refuses_to_replace_a_file(tmp_path):
    a, b = fake_run(tmp_path / "a", 0.1), fake_run(tmp_path / "b", 0.2)
    result = run_cli("plot", a, b, "-o", tmp_path / "c.png")
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    assert b"drew loss, contrastive, kl, eval_ndcg_at_10, lr, grad_norm for 2 run(s)" in result.stderr
    again = run_cli("plot", a, "-o", tmp_path / "c.png")
    assert again.returncode == 2 and b"exists already" in again.stderr
    to_stdout = run_cli("plot", a / "metrics.jsonl", "-o", "-")
    assert to_stdout.returncode == 0 and to_stdout.stdout[:8] == PNG
    missing = run_cli("plot", tmp_path / "nowhere", "-o", tmp_path / "d.png")
    assert missing.returncode == 2 and b"nowhere: not found" in missing.stderr and not (tmp_path / "d.png").exists()


def test_by_source_draws_one_line_per_run_and_source(tmp_path, monkeypatch):
    from ullme_cli.training import curves

    run = tmp_path / "mix"
    run.mkdir()
    steps = [{"step": s, "loss": 1.0 / s, "contrastive": 1.0 / s, "source": "qa.jsonl" if s % 3 else "nli.jsonl"} for s in range(1, 7)]
    steps.append({"step": 6, "eval_ndcg_at_10": 0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    assert set(curves.split_by_source("mix", curves.read_metrics(run))) == {"mix · qa.jsonl", "mix · nli.jsonl", "mix"}
    drawn = []
    real = curves.plot_runs
    monkeypatch.setattr(curves, "plot_runs", lambda series, output, by_source=False: drawn.append(by_source) or real(series, output, by_source))
    assert curves.write_plot([str(run)], str(tmp_path / "s.png"), by_source=True) == ["loss", "contrastive", "eval_ndcg_at_10"]
    assert drawn == [True] and (tmp_path / "s.png").read_bytes()[:8] == PNG
    single = fake_run(tmp_path / "single", 0.1)
    refused = run_cli("plot", single, "-o", tmp_path / "x.png", "--by-source")
    assert refused.returncode == 2 and b"no step of these runs recorded a data source" in refused.stderr


def test_plot_reads_each_run_once_and_a_card_reads_the_same_records(tmp_path, monkeypatch):
    """`ullme plot --by-source` checks, labels and draws from one read of each metrics.jsonl (it read each
    2-3 times), and the model card's last evaluation comes through the same reader."""
    from ullme_cli.training import curves

    run = tmp_path / "mix"
    run.mkdir()
    steps = [{"step": s, "loss": 1.0 / s, "source": "a.jsonl" if s % 2 else "b.jsonl"} for s in range(1, 5)]
    steps += [{"step": 2, "eval_ndcg_at_10": 0.3}, {"step": 4, "eval_ndcg_at_10": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"step": 5, "lo')  # a torn last line
    reads = []
    real = curves.metric_records
    monkeypatch.setattr(curves, "metric_records", lambda path: reads.append(path) or real(path))
    curves.write_plot([str(run)], str(tmp_path / "p.png"), by_source=True)
    assert len(reads) == 1
    assert curves.last_eval_metrics(run / "metrics.jsonl") == {"step": 4, "ndcg_at_10": 0.5} and len(reads) == 2
