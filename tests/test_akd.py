"""AKD: the loss terms on hand-checkable cases, the frozen/trainable split, continual rounds, UTS input."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cdcca.akd import AKDConfig, Distiller, DistillSample, drop_tokens
from cdcca.data.digits_shift import load_domain
from cdcca.models.trainable import add_lora, trainable_parameters
from cdcca.uts import pack_tokens


@pytest.fixture()
def distiller(pair):
    teacher, student = pair
    add_lora(student)
    paper = dict(lambda_query=1.0, lambda_repr=1.0, lambda_ce=1.0, lambda_kl=0.0)  # the paper's loss (Eq. 6)
    return Distiller(teacher, student, AKDConfig(steps=4, batch_size=4, lr=5e-3, fit_projections=False, **paper))


@pytest.fixture(scope="module")
def buffer_samples():
    return load_domain("printed", "stream", limit=4)


def test_query_loss_is_the_mse_after_phi(distiller, buffer_samples):
    samples = DistillSample.from_samples(distiller.student, buffer_samples)
    teacher_width = distiller.teacher.blip2.config.qformer_config.hidden_size
    student_width = distiller.student.blip2.config.qformer_config.hidden_size
    assert teacher_width == student_width  # the test preset keeps widths equal, so ϕ can be the identity
    with torch.no_grad():
        distiller.phi.weight.copy_(torch.eye(teacher_width))
        distiller.phi.bias.zero_()
    tokens, mask = distiller._stack(samples)

    with torch.no_grad():
        terms = distiller.losses(samples, ["seven"] * len(samples))

    with torch.no_grad():
        expected = F.mse_loss(
            distiller.student.query_outputs(tokens, mask), distiller.teacher.query_outputs(tokens, mask)
        )
    assert float(terms["query"]) == pytest.approx(float(expected), rel=1e-5)
    assert set(terms) == {"query", "repr", "ce", "total"}  # λ_kl = 0: no KL term
    assert float(terms["total"]) == pytest.approx(float(terms["query"] + terms["repr"] + terms["ce"]), rel=1e-5)


def test_kl_vanishes_when_the_student_is_the_teacher(pair, buffer_samples):
    teacher, _ = pair
    import copy

    twin = add_lora(copy.deepcopy(teacher))  # LoRA B = 0: the same function as the teacher
    distiller = Distiller(teacher, twin, AKDConfig(lambda_kl=1.0, temperature=3.0))
    samples = DistillSample.from_samples(teacher, buffer_samples)
    twin.eval()

    with torch.no_grad():
        terms = distiller.losses(samples, (["three", "one", "seven", "no"] * len(samples))[: len(samples)])

    assert float(terms["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["kl"]) >= 0


def test_cached_teacher_targets_give_the_terms_of_a_teacher_forward(pair, buffer_samples):
    """The round computes the teacher's side once (:meth:`Distiller.teacher_targets`, here in batches of 3, so the
    padding differs); L_repr and L_KL on it equal the terms computed straight from a teacher forward on the batch."""
    teacher, student = pair
    add_lora(student)
    distiller = Distiller(teacher, student, AKDConfig(lambda_kl=1.0, temperature=2.0, fit_projections=False))
    samples = DistillSample.from_samples(student, buffer_samples)
    labels = (["three", "it is a seven", "no", "one"] * len(samples))[: len(samples)]
    student.eval()
    with torch.no_grad():
        targets = distiller.teacher_targets(samples, labels, batch_size=3)
        terms = distiller.losses(samples, labels, targets=targets)
        tokens, mask = distiller._stack(samples)
        queries = teacher.query_outputs(tokens, mask)
        out = teacher.lm_forward(teacher.blip2.language_projection(queries), [s.prompt for s in samples], labels)
        mine = student.lm_forward(student.blip2.language_projection(student.query_outputs(tokens, mask)),
                                  [s.prompt for s in samples], labels)  # fmt: skip
        t_pos, s_pos = out.answer_positions, mine.answer_positions
        repr_ = F.mse_loss(distiller.psi(mine.hidden[:, :-1][s_pos]), out.hidden[:, :-1][t_pos])
        kl = F.kl_div((mine.logits[:, :-1][s_pos] / 2).log_softmax(-1), (out.logits[:, :-1][t_pos] / 2).log_softmax(-1),
                      log_target=True, reduction="batchmean") * 4  # fmt: skip
    assert [len(t.answer_hidden) for t in targets] == t_pos.sum(1).tolist()  # "it is a seven" has more answer tokens
    assert float(terms["repr"]) == pytest.approx(float(repr_), rel=1e-4)
    assert float(terms["kl"]) == pytest.approx(float(kl), rel=1e-4)
    assert float(terms["kl"]) > 1e-4  # the student differs from the teacher, so the comparison is not 0 == 0


def test_a_round_runs_the_teacher_forward_once_not_once_per_step(distiller, buffer_samples, monkeypatch):
    teacher = distiller.teacher
    calls = []
    forward = teacher.lm_forward
    monkeypatch.setattr(teacher, "lm_forward", lambda *a, **k: calls.append(len(a[1])) or forward(*a, **k))
    samples = DistillSample.from_samples(distiller.student, buffer_samples)

    report = distiller.run_round(samples)

    assert report.steps == 4
    assert calls == [len(samples)]  # one teacher-forced pass over the buffer; the steps reuse it


def test_drop_tokens_hides_a_share_of_the_kept_tokens_and_never_a_whole_sample():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 37, generator=generator) < 0.5
    mask[0] = False
    mask[0, 30] = True  # a sample with one kept token keeps it

    dropped = drop_tokens(mask, 0.75, generator)

    assert not (dropped & ~mask).any()  # only uploaded tokens can be seen
    assert dropped.sum(dim=1).min() >= 1 and bool(dropped[0, 30])
    share = 1 - float(dropped.sum()) / float(mask.sum())
    assert 0.65 < share < 0.8  # about the asked share (the one kept per sample takes a little off it)


def test_token_dropout_acts_on_training_steps_only(pair, buffer_samples):
    teacher, student = pair
    add_lora(student)
    distiller = Distiller(teacher, student, AKDConfig(token_dropout=0.5, fit_projections=False))
    samples = DistillSample.from_samples(student, buffer_samples)
    labels = distiller.pseudo_label(samples)
    seen = []
    query_outputs = student.query_outputs
    student.query_outputs = lambda tokens, mask: seen.append(mask.clone()) or query_outputs(tokens, mask)
    full = torch.stack([s.token_mask for s in samples])

    with torch.no_grad():
        student.eval()
        distiller.losses(samples, labels)
        student.train()
        distiller.losses(samples, labels)

    assert torch.equal(seen[0], full)  # scoring and checks see every uploaded token
    assert not (seen[1] & ~full).any() and int(seen[1].sum()) < int(full.sum())
    assert seen[1].sum(dim=1).min() >= 1


def test_a_round_changes_only_the_trainable_set(distiller, buffer_samples):
    student = distiller.student
    trainable = set(trainable_parameters(student))
    before = {n: p.detach().clone() for n, p in student.blip2.named_parameters()}
    samples = DistillSample.from_samples(student, buffer_samples)

    report = distiller.run_round(samples)

    after = dict(student.blip2.named_parameters())
    for name, value in before.items():
        if name in trainable:
            continue
        assert torch.equal(after[name], value), name
    assert any(not torch.equal(after[n], before[n]) for n in trainable)
    assert report.samples == len(samples) and report.steps == 4
    assert set(report.losses) == {"query", "repr", "ce", "total"} and report.seconds > 0


def test_rounds_are_continual(distiller, buffer_samples):
    samples = DistillSample.from_samples(distiller.student, buffer_samples)
    distiller.run_round(samples)
    after_first = {n: p.detach().clone() for n, p in trainable_parameters(distiller.student).items()}
    phi_after_first = distiller.phi.weight.detach().clone()

    distiller.run_round(samples)

    assert distiller.rounds == 2
    assert not torch.equal(distiller.phi.weight, phi_after_first)  # ϕ kept learning, not re-created
    moved = [n for n, p in trainable_parameters(distiller.student).items() if not torch.equal(p, after_first[n])]
    assert moved  # the second round started from the first round's student


def test_distillation_reduces_the_objective(pair, buffer_samples):
    teacher, student = pair
    add_lora(student)
    distiller = Distiller(teacher, student, AKDConfig(steps=30, batch_size=8, lr=1e-2, fit_projections=False))
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=8))
    labels = distiller.pseudo_label(samples)
    with torch.no_grad():
        student.eval()
        before = float(distiller.losses(samples, labels)["total"])

    distiller.run_round(samples)

    with torch.no_grad():
        after = float(distiller.losses(samples, labels)["total"])
    assert after < 0.8 * before


def test_uts_messages_feed_a_round(distiller, buffer_samples):
    student = distiller.student
    with torch.no_grad():
        tokens = student.visual_tokens(student.preprocess([s.image for s in buffer_samples]))
    keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
    keep[:3] = True
    messages = [pack_tokens(tokens[i], keep, torch.ones(len(keep)), robot_id="r1", sample_id=s.sample_id,
                            adapter_version=0, prompt=s.prompt, student_answer="", sample_entropy=1.0)
                for i, s in enumerate(buffer_samples)]  # fmt: skip

    samples = [sample for m in messages for sample in DistillSample.from_uts(m)]
    report = distiller.run_round(samples)

    assert int(samples[0].token_mask.sum()) == 3
    assert report.samples == len(buffer_samples)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lambda_query": -1.0}, "lambda_query"),
    ({"lambda_query": 0, "lambda_repr": 0, "lambda_ce": 0, "lambda_kl": 0}, "at least one"),
    ({"temperature": 0.0}, "temperature"), ({"steps": 0}, "steps"), ({"token_dropout": 1.0}, "token_dropout"),
    ({"token_dropout": -0.1}, "token_dropout"),
])  # fmt: skip
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AKDConfig(**kwargs)


@pytest.mark.parametrize("subspace_fold", [0, 4])
def test_a_round_ends_on_the_mean_of_its_last_steps(pair, buffer_samples, subspace_fold):
    teacher, _ = pair
    finals, seen = {}, {}
    for average_last in (0, 3):
        student = add_lora(copy.deepcopy(pair[1]))
        distiller = Distiller(teacher, student, AKDConfig(steps=5, batch_size=4, average_last=average_last,
                                                          subspace_fold=subspace_fold))  # fmt: skip
        steps = seen[average_last] = []  # the weights after each step (after its projection, in a subspace)
        project = distiller._project
        if subspace_fold:
            distiller._project = lambda *a, d=distiller, s=steps, p=project: (p(*a), s.append(d._snapshot()))
        else:
            distiller.optimizer.register_step_post_hook(lambda *_, d=distiller, s=steps: s.append(d._snapshot()))
        distiller.run_round(DistillSample.from_samples(student, buffer_samples))
        finals[average_last] = distiller._snapshot()
        assert len(steps) == 5
    # the same seed takes the same steps; only the end differs: the last step's weights, or the last three's mean
    for name, value in finals[3].items():
        assert torch.equal(seen[3][-1][name], seen[0][-1][name]) and torch.equal(finals[0][name], seen[0][-1][name])
        assert torch.allclose(value, torch.stack([s[name] for s in seen[3][-3:]]).mean(0), atol=1e-6), name
    assert any(not torch.equal(finals[3][n], finals[0][n]) for n in finals[0])
    with pytest.raises(ValueError, match="average_last"):
        AKDConfig(steps=5, average_last=6)


def test_distiller_needs_lora(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="LoRA"):
        Distiller(teacher, student)


def test_pseudo_label_keep_trains_on_the_most_confident_answers(pair):
    teacher, student = pair
    add_lora(student)
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=4))
    distiller = Distiller(teacher, student, AKDConfig(steps=1, batch_size=64, pseudo_label_keep=0.5))
    labels, entropy = distiller._pseudo_label(samples)

    report = distiller.run_round(samples)

    assert report.samples == len(samples) // 2 and report.losses["total"] > 0  # half the buffer trained on
    assert len(labels) == len(entropy) == len(samples)
    with pytest.raises(ValueError, match="pseudo_label_keep"):
        AKDConfig(pseudo_label_keep=0.0)


@pytest.mark.parametrize(("scores", "kept"), [([0.5, 0.4, 0.7, 0.6], 4), ([0.5, 0.4, 0.3, 0.2], 0)])
def test_check_slice_keeps_the_weights_that_predict_the_teacher_best(pair, monkeypatch, scores, kept):
    teacher, student = pair
    add_lora(student)
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=4))  # 12 samples
    distiller = Distiller(teacher, student, AKDConfig(steps=6, batch_size=4, lr=5e-2, check_fraction=0.25,
                                                      check_every=2))  # fmt: skip
    snapshots, calls = [], iter(scores)

    def scripted(check_samples, check_labels):  # start, then after steps 2, 4 and 6
        assert len(check_samples) == len(check_labels) == 3  # a quarter of the buffer is held out
        snapshots.append({k: v.detach().clone() for k, v in distiller.trainable.items()})
        return next(calls)

    monkeypatch.setattr(distiller, "_check_score", scripted)
    report = distiller.run_round(samples)

    assert report.kept_step == kept and report.check_score == (0.5, max(scores))
    assert report.samples == 9 and report.anchor_agreement is None  # trained on the rest; no anchors, no guard
    final = distiller.trainable
    assert all(torch.equal(final[k], snapshots[kept // 2][k]) for k in final)
    assert any(not torch.equal(snapshots[0][k], snapshots[-1][k]) for k in final)  # training did move the weights
    with pytest.raises(ValueError, match="check_fraction"):
        AKDConfig(check_fraction=1.0)


@pytest.mark.parametrize(("agreements", "kept"), [([1.0, 1.0, 0.9, 1.0], 6), ([1.0, 0.97, 0.5, 0.9], 2)])
def test_anchor_guard_keeps_only_weights_that_remember_the_source(pair, monkeypatch, agreements, kept):
    # Prepare: anchors from the source domain; the guard's verdicts are scripted (start, steps 2, 4, 6)
    teacher, student = pair
    add_lora(student)
    anchors = DistillSample.from_samples(student, load_domain("source", "train", limit=4))  # 12: 6 replay, 6 guard
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=4))
    distiller = Distiller(teacher, student, AKDConfig(steps=6, batch_size=4, lr=5e-2, check_every=2,
                                                      forget_tolerance=0.05), anchors=anchors)  # fmt: skip
    assert len(distiller.anchor_replay[0]) == len(distiller.anchor_check[0]) == 6
    assert distiller.anchor_check[1] == distiller._greedy(student, distiller.anchor_check[0])  # the base's answers
    snapshots, calls = [], iter(agreements)

    def scripted():
        snapshots.append({k: v.detach().clone() for k, v in distiller.trainable.items()})
        return next(calls)

    monkeypatch.setattr(distiller, "_anchor_agreement", scripted)
    # Execute
    report = distiller.run_round(samples)
    # Assert: without a check slice the latest step within the tolerance wins
    assert report.kept_step == kept and report.anchor_agreement == (1.0, agreements[kept // 2])
    assert "anchor" in report.losses and report.losses["anchor"] >= 0  # the replay term trained too
    assert all(torch.equal(distiller.trainable[k], snapshots[kept // 2][k]) for k in distiller.trainable)


def test_the_consensus_guard_checks_only_the_anchors_whose_base_answer_the_teacher_gives(pair, monkeypatch):
    # Prepare: 12 source anchors (6 held out for the guard); the teacher's answers are scripted to agree with the
    # base student's on the first, third and fifth held-out anchor only
    teacher, student = pair
    add_lora(student)
    anchors = DistillSample.from_samples(student, load_domain("source", "train", limit=4))
    plain = Distiller(teacher, student, AKDConfig(steps=1), anchors=anchors)
    base = plain.anchor_check[1]
    real = Distiller._greedy

    asked = []

    def greedy(model, samples, *args, **kwargs):
        answers = real(model, samples, *args, **kwargs)
        if model is teacher:
            asked.append([id(x) for x in samples])
            return [b if i % 2 == 0 else b + " not" for i, b in enumerate(base)]
        return answers

    monkeypatch.setattr(Distiller, "_greedy", staticmethod(greedy))
    # Execute
    sure = Distiller(teacher, student, AKDConfig(steps=1, guard_consensus=True), anchors=anchors)
    # Assert: the guard keeps what the teacher confirms, with the base's answers; the replay is untouched
    def ids(samples):
        return [id(x) for x in samples]

    assert asked == [ids(plain.anchor_check[0])]  # the teacher answered the held-out anchors, once
    assert len(base) == 6 and ids(sure.anchor_check[0]) == [id(plain.anchor_check[0][i]) for i in (0, 2, 4)]
    assert sure.anchor_check[1] == [base[i] for i in (0, 2, 4)]
    assert ids(sure.anchor_replay[0]) == ids(plain.anchor_replay[0]) and sure.anchor_replay[1] == plain.anchor_replay[1]
    off = Distiller(teacher, student, AKDConfig(steps=1), anchors=anchors)  # the same teacher, the option off
    assert ids(off.anchor_check[0]) == ids(plain.anchor_check[0]) and len(asked) == 1  # every one, the teacher unasked
    # ... and every held-out anchor when the teacher confirms none of them
    monkeypatch.setattr(Distiller, "_greedy", staticmethod(
        lambda model, samples, *a, **k: [x + " not" for x in base] if model is teacher else real(model, samples)))
    none = Distiller(teacher, student, AKDConfig(steps=1, guard_consensus=True), anchors=anchors)
    assert ids(none.anchor_check[0]) == ids(plain.anchor_check[0]) and none.anchor_check[1] == base


@pytest.mark.parametrize(("max_backtracks", "kept", "scales"), [(3, 6, [1, 1, 1, 1, 2, 2]), (0, 6, [1] * 6)])
def test_a_broken_guard_sends_the_round_back_under_a_firmer_anchor(pair, monkeypatch, max_backtracks, kept, scales):
    # Prepare: the guard's verdicts are scripted (start, steps 2, 4, 6): step 4 forgets, step 6 is fine again
    teacher, student = pair
    add_lora(student)
    anchors = DistillSample.from_samples(student, load_domain("source", "train", limit=4))
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=4))
    config = AKDConfig(steps=6, batch_size=4, lr=5e-2, check_every=2, forget_tolerance=0.05,
                       max_backtracks=max_backtracks)  # fmt: skip
    distiller = Distiller(teacher, student, config, anchors=anchors)
    snapshots, calls, seen = [], iter([1.0, 1.0, 0.5, 1.0]), []
    losses = distiller.losses

    def scripted():
        snapshots.append({k: v.detach().clone() for k, v in distiller.trainable.items()})
        return next(calls)

    def recording(batch, labels, anchors=None, anchor_scale=1.0, anchor_queries=None, targets=None):
        seen.append((anchor_scale, {k: v.detach().clone() for k, v in distiller.trainable.items()}))
        return losses(batch, labels, anchors, anchor_scale, anchor_queries, targets)

    monkeypatch.setattr(distiller, "_anchor_agreement", scripted)
    monkeypatch.setattr(distiller, "losses", recording)
    # Execute
    report = distiller.run_round(samples)
    # Assert: with backtracking, step 5 starts from step 2's weights with the anchor weight doubled; without it,
    # from step 4's (which forgot); either way the latest admissible step, 6, is kept
    assert [scale for scale, _ in seen] == scales
    assert report.kept_step == kept and report.backtracks == (1 if max_backtracks else 0)
    step_five = seen[4][1]
    assert all(torch.equal(step_five[k], snapshots[1][k]) for k in step_five) == bool(max_backtracks)
    assert all(torch.equal(distiller.trainable[k], snapshots[kept // 2][k]) for k in distiller.trainable)
    with pytest.raises(ValueError, match="max_backtracks"):
        AKDConfig(max_backtracks=-1)


def test_the_query_anchor_holds_how_the_student_reads_source_images(pair):
    # Prepare: a guard that keeps the base student's query outputs on its replayed anchors
    teacher, student = pair
    add_lora(student)
    anchors = DistillSample.from_samples(student, load_domain("source", "train", limit=4))
    distiller = Distiller(teacher, student, AKDConfig(lambda_anchor_query=10.0), anchors=anchors)
    replay, answers = distiller.anchor_replay
    base = distiller.anchor_queries
    assert base.shape == (len(replay), student.num_query_tokens, student.blip2.config.qformer_config.hidden_size)
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=2))
    labels = ["one"] * len(samples)
    batch = (replay[:4], answers[:4])
    # Execute: the terms on the base student, then after a nudge of the Q-Former's adapters
    with torch.no_grad():
        at_start = distiller.losses(samples, labels, batch, 2.0, base[:4])
        for name, param in distiller.trainable.items():
            if "qformer" in name and "lora_B" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
        moved = distiller.losses(samples, labels, batch, 2.0, base[:4])
        now = student.query_outputs(*distiller._stack(replay[:4]))
    # Assert: zero while the student is the base; then the MSE to the base's outputs, in the total at 10 × 2
    assert float(at_start["anchor_query"]) == pytest.approx(0.0, abs=1e-10)
    expected = float(F.mse_loss(now, base[:4]))
    assert expected > 1e-6 and float(moved["anchor_query"]) == pytest.approx(expected, rel=1e-4)
    others = sum(float(moved[k]) * w for k, w in [("query", 3.0), ("repr", 3.0), ("kl", 2.0), ("anchor", 2.0)])
    assert float(moved["total"]) == pytest.approx(others + 20.0 * expected, rel=1e-4)
    assert Distiller(teacher, student, AKDConfig(lambda_anchor_query=0.0), anchors=anchors).anchor_queries is None
    with pytest.raises(ValueError, match="lambda_anchor_query"):
        AKDConfig(lambda_anchor_query=-1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_query_anchor_keeps_unseen_source_images_read_as_before(tokenizer, seed):
    # Prepare: the same round on a recoloured stream, without and with the query anchor; the guard cannot intervene
    from cdcca.models.checkpoint import build_pair
    from cdcca.models.presets import get_preset

    teacher, base = build_pair(get_preset("test"), tokenizer, seed=seed)
    teacher.eval()

    def drift(weight: float) -> float:
        student = add_lora(copy.deepcopy(base))
        anchors = DistillSample.from_samples(student, load_domain("source", "train", limit=8))
        unseen = DistillSample.from_samples(student, load_domain("source", "test", limit=8))  # never replayed
        stream = DistillSample.from_samples(student, load_domain("colour_inverted", "stream", limit=8))
        config = AKDConfig(steps=8, batch_size=8, lr=2e-2, forget_tolerance=1.0, max_backtracks=0,
                           lambda_anchor_query=weight)  # fmt: skip
        distiller = Distiller(teacher, student, config, anchors=anchors)
        with torch.no_grad():
            before = student.eval().query_outputs(*distiller._stack(unseen))
        distiller.run_round(stream)
        with torch.no_grad():
            after = student.eval().query_outputs(*distiller._stack(unseen))
        return float(F.mse_loss(after, before))

    # Execute
    free, anchored = drift(0.0), drift(10.0)
    # Assert: the round moves how source images it never replayed are read, and far less under the anchor
    assert free > 0.1 and anchored < 0.2 * free


def test_projections_start_from_the_least_squares_fit(pair):
    teacher, student = pair
    add_lora(student)
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=8))
    distiller = Distiller(teacher, student, AKDConfig(lambda_kl=0.0))
    labels = distiller.pseudo_label(samples)
    before = float(distiller.losses(samples, labels)["query"])

    distiller.fit_projections(samples, labels)

    after = float(distiller.losses(samples, labels)["query"])
    assert after < 0.5 * before  # the random ϕ was far from the best linear map
    with torch.no_grad():  # and it is the best one: a nudge in any direction does not lower the fit error
        for sign in (1.0, -1.0):
            distiller.phi.weight.add_(sign * 1e-3)
            assert float(distiller.losses(samples, labels)["query"]) >= after - 1e-6
            distiller.phi.weight.sub_(sign * 1e-3)


def test_a_teacher_whose_head_does_not_rebuild_its_logits_is_a_clear_error(pair, buffer_samples):
    # a logit scale after the head (as a soft-capped LM has) breaks what L_KL rebuilds from the cached hidden states
    teacher, student = pair
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    add_lora(student)
    distiller = Distiller(teacher, student, AKDConfig(fit_projections=False))
    samples = DistillSample.from_samples(student, buffer_samples)
    labels = ["three"] * len(samples)
    forward = teacher.lm.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    teacher.lm.forward = scaled

    with pytest.raises(ValueError, match="LM head"):
        distiller.teacher_targets(samples, labels)
    teacher.lm.forward = forward
    assert len(distiller.teacher_targets(samples, labels)) == len(samples)  # checked once it holds, then trusted


def test_anchor_projection_removes_only_the_part_of_the_rounds_gradient_that_raises_the_anchor_loss(pair):
    # Prepare: a distiller with replay, its student nudged off the base so that the anchor terms have a gradient
    teacher, student = pair
    add_lora(student)
    anchors = DistillSample.from_samples(student, load_domain("source", "train", limit=4))
    distiller = Distiller(teacher, student, AKDConfig(anchor_projection=True), anchors=anchors)
    with torch.no_grad():
        for name, param in distiller.trainable.items():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    samples = DistillSample.from_samples(student, load_domain("colour_inverted", "stream", limit=4))
    labels = [("one", "seven", "four")[i % 3] for i in range(len(samples))]
    batch = (distiller.anchor_replay[0][:2], distiller.anchor_replay[1][:2])
    queries = distiller.anchor_queries[[0, 1]]  # indexed as a round picks them (a slice stays an inference tensor)

    def gradients(split: bool) -> tuple[torch.Tensor, ...]:
        distiller.optimizer.zero_grad(set_to_none=True)
        terms = distiller.losses(samples, labels, batch, 1.0, queries)
        if split:
            round_loss, anchor = terms["split"]
            parts = [torch.autograd.grad(loss, distiller._params, retain_graph=True, allow_unused=True)
                     for loss in (round_loss, anchor)]  # fmt: skip
            flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(part, distiller._params)]) for part in parts]  # fmt: skip
        distiller._backward(terms)
        applied = torch.cat([p.grad.reshape(-1) for p in distiller._params])
        return (applied, *flat) if split else (applied,)

    # Execute: the projected update, and the plain one without the option
    applied, task, kept = gradients(split=True)
    distiller.config = AKDConfig(anchor_projection=False)
    (plain,) = gradients(split=False)
    # Assert: the parts add up to the plain gradient; a conflict is removed, leaving the anchor's own pull whole
    torch.testing.assert_close(task + kept, plain, rtol=1e-4, atol=1e-6)
    dot, norm = float(task @ kept), float(kept @ kept)
    assert dot < 0 < norm  # this nudge and batch conflict: the round's gradient would raise the anchor loss
    torch.testing.assert_close(applied, task - dot / norm * kept + kept, rtol=1e-4, atol=1e-6)
    assert float(applied @ kept) == pytest.approx(norm, rel=1e-3)  # what is left of the round is orthogonal to it
    assert float(plain @ kept) < norm - 1.0  # without the option the round's part pulls against the anchors


def test_the_confident_term_is_the_cross_entropy_on_the_tokens_the_teacher_is_sure_of(pair, buffer_samples):
    # Prepare: the teacher's labels for a small buffer and its probability of each of its own answer tokens
    teacher, student = pair
    add_lora(student)
    samples = DistillSample.from_samples(student, buffer_samples)

    def terms(confidence: float, weight: float = 1.0) -> dict[str, float]:
        distiller = Distiller(teacher, student, AKDConfig(lambda_confident=weight, confidence=confidence))
        with torch.no_grad():
            return {k: float(v) for k, v in distiller.losses(samples, labels).items()}

    labels = Distiller(teacher, student, AKDConfig()).pseudo_label(samples)
    with torch.no_grad():
        out = teacher.lm_forward(teacher.blip2.language_projection(teacher.query_outputs(
            *Distiller._stack(samples))), [s.prompt for s in samples], labels)  # fmt: skip
        answer = out.labels[:, 1:][out.answer_positions]
        sure = out.logits[:, :-1][out.answer_positions].softmax(-1).gather(1, answer[:, None])[:, 0]
    threshold = float(sure.median())
    # Execute: no threshold, the median of the teacher's probabilities, and the term off
    everywhere, half, off = terms(0.0), terms(threshold), terms(threshold, weight=0.0)
    # Assert: every token counts at 0 (the plain CE on the teacher's answers), fewer above the median, and the term
    # adds to the total at its weight
    assert everywhere["confident"] == pytest.approx(everywhere["ce"], rel=1e-5)
    assert bool((sure >= threshold).any() and (sure < threshold).any())
    assert 0.0 < half["confident"] < everywhere["confident"] and "confident" not in off
    assert half["total"] == pytest.approx(off["total"] + half["confident"], rel=1e-5)
    with pytest.raises(ValueError, match="confidence"):
        AKDConfig(confidence=1.5)


def test_the_vote_over_token_views_takes_the_majority_and_the_full_view_wins_ties(pair, buffer_samples):
    from cdcca.akd import _vote

    assert _vote("seven", ["one", "one", "seven"]) == "seven"  # a tie the full view is part of
    assert _vote("seven", ["one", "one", "four"]) == "one"
    assert _vote("seven", ["one", "four"]) == "seven" and _vote("seven", []) == "seven"
    # views that hide nothing are the full view: the labels are the plain ones
    teacher, student = pair
    add_lora(student)
    samples = DistillSample.from_samples(student, buffer_samples)
    plain = Distiller(teacher, student, AKDConfig()).pseudo_label(samples)
    voted = Distiller(teacher, student, AKDConfig(label_views=3, label_view_drop=0.0)).pseudo_label(samples)
    assert voted == plain
    with pytest.raises(ValueError, match="label_views"):
        AKDConfig(label_views=-1)
