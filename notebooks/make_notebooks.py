"""Write the suite's notebooks (nbformat v4) from the cell sources below.

    .venv/bin/python notebooks/make_notebooks.py        # rewrites notebooks/NN_*.ipynb

The notebooks are thin: every non-trivial cell calls nbcore (``nbcore.notebooks`` for settings,
data and training, ``nbcore.checks``, ``nbcore.analysis``, ``nbcore.demo``; plots from
``nbcore.viz``). The first code cell of each is tagged ``parameters`` for papermill; ``None``
means "the profile's value" (``nbcore.notebooks.PROFILES``).
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

COMMON = '''profile = "cpu"       # smoke | cpu | gpu (sizes below left None come from nbcore.notebooks.PROFILES)
device = "auto"       # auto | cpu | cuda
run_dir = None        # None: REPO/outputs/runs/PROFILE (the runner passes its run folder)
seed = 0
fail_check = False    # True adds a deliberately failing check (tests the failure path)
preset = None         # model preset: tiny | production
model_overrides = None   # dict of ModelConfig fields over the preset, e.g. {"depth": 2}
'''

# The run's data and training knobs: declared by every notebook that may train (03-06), so a
# command-line value reaches all of them and they agree on what "the run's models" are.
TRAIN = '''n_data = None         # shapes-world samples (train + val)
batch_size = None
train_steps = None    # steps of the baseline and of each patch model
lr = None
warmup = None
milestone_every = None   # steps between kept checkpoints
patch_pos = None      # the main patch model's positional embedding: none | learned | sincos
new_param_lr_scale = None   # lr multiplier for the patch parameters of the warm-started models
'''
CTX_ARGS = ("profile", "device", "run_dir", "seed", "fail_check")


def header(name: str, extra: str = "", train: bool = False) -> list:
    """The parameters cell (COMMON [+ TRAIN] + extra, tagged) and the cell that starts the context
    with every declared parameter."""
    from papermill.translators import PythonTranslator
    src = COMMON + (TRAIN if train else "") + extra
    names = [p.name for p in PythonTranslator.inspect({"source": src})]
    lines = [ln.split("=")[0].strip() for ln in src.splitlines() if ln.strip() and not ln.startswith("#")]
    if names != lines:  # papermill skips a line it cannot parse (e.g. '=' in a comment): never ship that
        raise ValueError(f"papermill parses {names}, the cell assigns {lines}")
    cell = new_code_cell(src)
    cell.metadata["tags"] = ["parameters"]
    given = ", ".join(f"{k}={k}" for k in names if k not in CTX_ARGS)
    start = ("from nbcore import notebooks as suite, viz\n"
             f"ctx = suite.start({name!r}, profile=profile, run_dir=run_dir, device=device, seed=seed, fail_check=fail_check,\n"
             f"                  {given})\n"
             "s = ctx.s\n"
             "print(f'run folder {ctx.run_dir}; outputs -> {ctx.out}; device {ctx.device}')")
    return [cell, new_code_cell(start)]


def nb(cells) -> "nbformat.NotebookNode":
    import hashlib
    for i, cell in enumerate(cells):  # stable ids: regenerating an unchanged notebook changes no byte
        cell.id = f"c{i:02d}-" + hashlib.sha1(cell.source.encode()).hexdigest()[:8]
    book = new_notebook(cells=cells)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    return book


# --------------------------------------------------------------------------- 01 architecture

NB01 = nb([
    new_markdown_cell("# 01 · Architecture\n\nNanoDiT with DINOv3 patch conditioning: both presets built, the "
                      "cross-attention context `[text | CLS | patches]`, parameter counts, the parameters the "
                      "patch model adds, and the four CFG modes. Everything here is computed by `nbcore`."),
    *header("01_architecture", "production_forward = None   # one batch-1 forward of the production preset (None: all profiles but smoke)\n"),
    new_markdown_cell("## Both presets\n`production` is the seed plan's model; `tiny` is the shapes world on a CPU. "
                      "`use_dino_patches=False` is exactly the pre-patch architecture."),
    new_code_cell('''from nbcore.checks import architecture_summary
from nbcore.model import PRESETS
summaries = {name: architecture_summary(PRESETS[name]) for name in ("production", "tiny")}
for name, a in summaries.items():
    print(f"{name:10s} context {a['context']}  params patch {a['params_patch']:,}  pre-patch {a['params_prepatch']:,}  "
          f"new {a['params_new']:,}  image tokens {a['image_tokens']}")
    ctx.metrics[f"{name}_params_patch"] = a["params_patch"]
    ctx.metrics[f"{name}_params_prepatch"] = a["params_prepatch"]
    ctx.metrics[f"{name}_context_len"] = a["context_len"]
ctx.metrics["production_new_params"] = summaries["production"]["params_new"]
ctx.check(summaries["production"]["context_len"] == 512 + 1 + 196, "production context is 512 | 1 | 196 = 709",
          context=summaries["production"]["context"])
for name, a in summaries.items():
    ctx.check(a["params_patch"] - a["params_prepatch"] == a["params_new"],
              f"{name}: patch - pre-patch parameter count == size of the new parameters")
    ctx.check(a["new_names"] == ["dino_patch_proj.bias", "dino_patch_proj.weight", "null_dino_patches"],
              f"{name}: the new parameters are dino_patch_proj and null_dino_patches", names=a["new_names"])'''),
    new_markdown_cell("## The cross-attention context\nText padding is masked; CLS and the patches are always valid."),
    new_code_cell('''p = summaries["production"]["context"]
ctx.save(viz.plot_context_layout(p["text"], p["cls"], p["patches"], n_real_text=60), "context_production.png")
t = summaries["tiny"]["context"]
ctx.save(viz.plot_context_layout(t["text"], t["cls"], t["patches"], n_real_text=12), "context_tiny.png")'''),
    new_markdown_cell("## Parameter counts and the new parameters"),
    new_code_cell('''table = {"params (M)": {f"{n} {v}": summaries[n][f"params_{v}"] / 1e6 for n in summaries for v in ("prepatch", "patch")}}
ctx.save(viz.bar_table(table, title="parameters: pre-patch vs patch model"), "param_counts.png")
rows = [r for n in summaries for r in summaries[n]["new_table"]]
ctx.save(viz.plot_table(rows, title="parameters the patch model adds (warm start initialises these)"), "new_parameters.png")
for r in rows:
    print(r)'''),
    new_markdown_cell("## The four CFG modes\nEach training sample draws one mode; the sampler combines the four "
                      "branches in one batched forward (`nbcore.sample.Guidance`, formulas in its docstring)."),
    new_code_cell('''from nbcore.checks import cfg_modes
from nbcore.model import preset as model_preset
modes = cfg_modes(model_preset("tiny"), text_scale=s["text_scale"], dino_scale=s["dino_scale"])   # cheap at any profile
ctx.save(viz.plot_table(modes["table"], title="CFG modes: what each branch sees"), "cfg_modes.png")
ctx.save(viz.plot_table(modes["coefficients"], title=f"guidance coefficients (s_t={s['text_scale']}, s_d={s['dino_scale']})"),
         "guidance_coefficients.png")
for r in modes["table"]:
    print(r)
ctx.check(all(r["dropped input has no influence"] for r in modes["table"]), "each CFG mode ignores what it drops")
ctx.check(modes["distinct"], "the four modes give four different outputs (perturbed tiny model)")'''),
    new_markdown_cell("## A production-size forward (B = 1)"),
    new_code_cell('''from nbcore.checks import production_forward as prod_fwd
run_prod = production_forward if production_forward is not None else s["profile"] != "smoke"
if run_prod:
    r = prod_fwd(ctx.device)
    print(r)
    ctx.metrics.update({f"production_forward_{k}": v for k, v in r.items() if k != "shape"})
    ctx.check(r["shape"] == [1, 16, 64, 64] and r["finite"], "production forward gives (1, 16, 64, 64), finite", shape=r["shape"])
else:
    print("skipped in this profile (production_forward=True to run it)")'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 02 checks

NB02 = nb([
    new_markdown_cell("# 02 · Shape and gradient checks\n\nThe checks of `tests/test_model.py`, computed by "
                      "`nbcore.checks.run_model_checks` on perturbed random models (zero-initialised output "
                      "layers would make every invariance trivial) and shown as a table. A failed row fails "
                      "the notebook. They run on the `tiny` preset by default (the contracts do not depend on "
                      "size; notebook 01 runs a production-size forward), on the CPU, in float32."),
    *header("02_checks", "check_preset = \"tiny\"   # preset the checks run on (None: the run's own preset and overrides)\n"),
    new_code_cell('''from nbcore.checks import run_model_checks
from nbcore.model import preset as model_preset
check_cfg = model_preset(check_preset) if check_preset else suite.model_config(ctx)
print("checks run on", check_cfg)
rows = run_model_checks(check_cfg)
ctx.save(viz.plot_table([{k: r[k] for k in ("check", "variant", "value", "tolerance", "passed")} for r in rows],
                        title="model contract checks"), "checks_table.png")
print(f"{'check':38s} {'variant':12s} {'value':>10s} {'tol':>8s}  passed  detail")
for r in rows:
    print(f"{r['check']:38s} {r['variant']:12s} {r['value']:10.3g} {r['tolerance']:8.1g}  {str(r['passed']):6s}  {r['detail']}")
    ctx.check(r["passed"], f"{r['check']} [{r['variant']}]", value=r["value"])
ctx.metrics.update(n_checks=len(rows), n_passed=sum(r["passed"] for r in rows))
ctx.metrics["rows"] = rows'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 03 training

NB03 = nb([
    new_markdown_cell("# 03 · Training\n\nThe shapes world (made once per run folder), the pre-patch baseline, "
                      "then the patch model warm-started from the baseline's last checkpoint for the same number "
                      "of steps. Curves of loss, loss by timestep bin, velocity and gradient norms."),
    *header("03_training", train=True),
    new_markdown_cell("## The shapes world"),
    new_code_cell('''data_dir = suite.ensure_data(ctx)
val = suite.load_val_batch(data_dir, 6)
import textwrap
ctx.save(viz.image_grid({textwrap.fill(c, 24): val["png"][i:i + 1] for i, c in enumerate(val["txt"])}, size=2.0),
         "shapes_world.png")
print(data_dir, *val["txt"], sep="\\n")'''),
    new_markdown_cell("## Baseline (pre-patch), then the patch model warm-started from it"),
    new_code_cell('''patch = suite.patch_variant(s["patch_pos"])
summaries = {v: suite.ensure_trained(ctx, v) for v in ("baseline", patch)}
logs = {v: suite.load_log(ctx, v) for v in summaries}
warm = suite.warm_start_event(ctx, patch)
print("warm start:", warm)
for v, sm in summaries.items():
    print(f"{v:14s} steps {sm['steps']}  final loss {sm['final_loss']:.4f}  {sm['steps_per_s']:.1f} steps/s  "
          f"skipped {sm['skipped']}  reused {sm['reused']}")
    ctx.metrics[f"{v}_final_loss"] = sm["final_loss"]
    ctx.metrics[f"{v}_steps_per_s"] = sm["steps_per_s"]
    ctx.check(sm["final_loss"] is not None and sm["skipped"] == 0, f"{v}: finite loss, no non-finite step skipped",
              final=sm["final_loss"], skipped=sm["skipped"])
# Trend checks need a few log records (a plumbing run of 2 steps has one): the baseline learns from
# its zero-output init; the warm-started patch model does not end worse than the baseline by > 10%.
lb, lp = summaries["baseline"]["final_loss"], summaries[patch]["final_loss"]
if min(len(r) for r in logs.values()) >= 3:
    ctx.check(lb < logs["baseline"][0]["loss"], "baseline: loss fell during training", first=logs["baseline"][0]["loss"], final=lb)
    ctx.check(lp <= 1.1 * lb, "patch model: final loss within 10% of the baseline's (warm start did not hurt)", patch=lp, baseline=lb)
else:
    print("too few log records to judge loss trends (plumbing run): trend checks skipped")
ctx.check(warm is not None and warm["new"] == suite.new_parameter_names(ctx, patch),
          "warm start initialised exactly the new parameters", new=None if warm is None else warm["new"])
ctx.metrics["warm_start_new"] = None if warm is None else warm["new"]
ctx.metrics["warm_start_loaded"] = None if warm is None else warm["n_loaded"]'''),
    new_markdown_cell("## Curves\nLoss, velocity RMS (predicted vs target) and gradient norms (total and of "
                      "`dino_patch_proj`); the patch model's steps continue from the baseline's."),
    new_code_cell('''shifted = suite.shift_steps(logs, {patch: summaries["baseline"]["steps"]})
smooth = max(1, len(logs["baseline"]) // 30)
ctx.save(viz.plot_curves(shifted, ["loss", "v_pred_rms", "v_target_rms"], smooth=smooth, logy=["loss"]), "curves_loss_velocity.png")
ctx.save(viz.plot_curves(shifted, ["grad_norm", "grad_norm_patch_proj", "lr"], smooth=smooth), "curves_gradients.png")
ctx.save(viz.plot_loss_by_bin({v: sm["loss_by_bin"] for v, sm in summaries.items()}), "loss_by_bin.png")
ctx.metrics["loss_by_bin"] = {v: sm["loss_by_bin"] for v, sm in summaries.items()}'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 04 routing

NB04 = nb([
    new_markdown_cell("# 04 · Attention routing\n\nWhere does each image token's cross-attention go: text, "
                      "CLS or patches? Per block, head and timestep along a sampling trajectory; which patch each "
                      "image token attends to; and CLS use over training (seed risk 5: is CLS attended at all?). "
                      "Uses the patch model trained by notebook 03 (trained here if missing)."),
    *header("04_attention_routing", "routing_samples = None\nrouting_steps = None\n", train=True),
    new_code_cell('''from nbcore import analysis
from nbcore.sample import load_model
patch = suite.patch_variant(s["patch_pos"])
suite.ensure_trained(ctx, patch)
ckpts = suite.variant_checkpoints(ctx.run_dir, patch)
model = load_model(ckpts[-1][1], use_ema=True, device=ctx.device)
cfg = model.cfg
batch = suite.load_val_batch(ctx.run_dir / "data", s["routing_samples"], device=ctx.device)
z, rec = analysis.capture_sampling(model, batch, steps=s["routing_steps"], seed=ctx.seed)
tabs = analysis.routing_tables(rec)
print("overall mass:", {k: round(v, 4) for k, v in tabs["overall"].items()}, " checkpoint step", ckpts[-1][0])
ctx.check(abs(sum(tabs["overall"].values()) - 1) < 1e-4, "routing masses sum to 1", total=sum(tabs["overall"].values()))
ctx.check(tabs["overall"]["cls"] > 0 and tabs["overall"]["patches"] > 0, "CLS and patches are in the context (mass > 0)")
ctx.metrics.update({f"mass_{k}": v for k, v in tabs["overall"].items()})'''),
    new_markdown_cell("## Mass per block and head"),
    new_code_cell('''ctx.save(viz.plot_routing_mass(tabs["per_block_head"], title=f"{patch}: mass per block and head"), "mass_block_head.png")
ctx.save(viz.plot_mass_over_t(tabs["t"], tabs["per_t"]), "mass_over_t.png")
ctx.metrics["mass_per_block"] = tabs["per_block"]
ctx.metrics["mass_per_t"] = {"t": tabs["t"], "mass": tabs["per_t"]}'''),
    new_markdown_cell("## Which patch does each image token attend to?\nHead-averaged attention over the patch "
                      "grid of the last block at the last sampling step, for tokens under each shape's centre; the "
                      "cyan cross marks the token's own position on the patch grid."),
    new_code_cell('''import torch
h = w = cfg.input_size // cfg.patch_size
maps = rec.patch_maps[-1, -1]                                   # (B, N, P): last step, last block
for i in range(min(2, maps.shape[0])):
    q = analysis.query_tokens(batch["json"][i] if "json" in batch else None, h, w, n=4)
    ctx.save(viz.plot_patch_maps(batch["png"][i], maps[i].numpy(), (h, w), q, cfg.dino_grid), f"patch_maps_{i}.png")
loc = analysis.patch_locality(rec.patch_maps, (h, w), cfg.dino_grid)
print(loc)
ctx.metrics.update({f"locality_{k}": v for k, v in loc.items()})'''),
    new_markdown_cell("## CLS use over training (milestone checkpoints)"),
    new_code_cell('''over = analysis.cls_use(ckpts, batch, ctx.device)
ctx.save(viz.plot_curves({src: [{"step": r["step"], "mass": r[src]} for r in over] for src in ("text", "cls", "patches")},
                         ["mass"]), "mass_over_training.png")
ctx.metrics["mass_over_training"] = over
M = batch["text_mask"].sum(1).float().mean().item() + 1 + cfg.num_patches   # mean context length
answer, share = analysis.risk5_answer(over, tabs, loc, M)
print(answer)
ctx.metrics["cls_share_vs_uniform"] = share
ctx.metrics["answer_risk5"] = answer'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 05 milestones

NB05 = nb([
    new_markdown_cell("# 05 · Milestones\n\nCheckpoints across steps, and the pre-patch baseline vs the patch "
                      "models on every validation metric (`nbcore.validate`), including the patch positional-"
                      "embedding ablation (none / learned / sin-cos, each warm-started from the same baseline for "
                      "the same number of steps: seed open question 5). The seed's success criteria are answered "
                      "below from the numbers."),
    *header("05_milestones", "ablation = None      # further patch_pos variants to train and compare\n"
            "val_samples = None\nsample_steps = None\ntext_scale = None\ndino_scale = None\n", train=True),
    new_code_cell('''from nbcore import analysis
variants = ["baseline"] + [suite.patch_variant(p) for p in dict.fromkeys([s["patch_pos"], *s["ablation"]])]
summaries = {v: suite.ensure_trained(ctx, v) for v in variants}
for v, sm in summaries.items():
    print(f"{v:14s} {sm['steps']} steps, final loss {sm['final_loss']:.4f}, reused {sm['reused']}")'''),
    new_markdown_cell("## Validation of every milestone checkpoint"),
    new_code_cell('''table = suite.validate_milestones(ctx, variants)      # variant -> [metrics per milestone step]
final = {v: rows[-1] for v, rows in table.items()}
keys = suite.metric_keys(final)
print("metrics:", keys)
for v, rows in table.items():
    print(v, [(r["step"], {k: analysis.fmt(r.get(k)) for k in keys[:4]}) for r in rows])
ctx.save(viz.plot_curves(table, keys[:4]), "milestones_a.png")
if len(keys) > 4:
    ctx.save(viz.plot_curves(table, keys[4:8]), "milestones_b.png")
ctx.metrics["milestones"] = table
ctx.check(all(len(rows) >= 2 for rows in table.values()), "every variant has at least two milestones")'''),
    new_markdown_cell("## Final checkpoints: baseline vs patch models"),
    new_code_cell('''bars = {k: {v: final[v].get(k) for v in variants} for k in keys}
lower = {k for k in keys if suite.lower_is_better(k)}
ctx.save(viz.bar_table({k: bars[k] for k in keys[:5]}, title=f"final checkpoints ({s['train_steps']} steps)", lower_is_better=lower), "final_a.png")
if len(keys) > 5:
    ctx.save(viz.bar_table({k: bars[k] for k in keys[5:10]}, lower_is_better=lower), "final_b.png")
print(f"{'metric':34s}" + "".join(f"{v:>15s}" for v in variants))
for k in keys:
    print(f"{k:34s}" + "".join(f"{analysis.fmt(final[v].get(k), 4):>15s}" for v in variants))
ctx.save(viz.plot_table([{"metric": k, **{v: final[v].get(k) for v in variants}} for k in keys], title="final metrics"), "final_table.png")
for k in keys:
    ctx.metrics[f"final_{k}"] = {v: final[v].get(k) for v in variants}'''),
    new_markdown_cell("## Positional embedding of the patches (open question 5)"),
    new_code_cell('''ablation = [v for v in variants if v != "baseline"]
best = suite.rank_variants({v: final[v] for v in ablation}, keys)
print(best["text"])
ctx.metrics["ablation_answer"] = best["text"]
ctx.metrics["ablation_best"] = best["best"]'''),
    new_markdown_cell("## The seed's success criteria, answered from the numbers"),
    new_code_cell('''patch = suite.patch_variant(s["patch_pos"])
crit = analysis.success_criteria(summaries, final, "baseline", patch, s["train_steps"])
from IPython.display import Markdown, display
display(Markdown(analysis.criteria_markdown(crit)))
ctx.save(analysis.criteria_figure(crit, title=f"success criteria: {patch} vs baseline ({s['train_steps']} steps)"), "criteria.png")
for r in crit:
    print(f"[{r['level']}] {r['criterion']}: {r['verdict'].upper()} -- {r['evidence']}")
ctx.metrics["criteria"] = crit
ctx.metrics["criteria_met"] = sum(r["verdict"] == "met" for r in crit)
ctx.check(all(r["verdict"] != "met" or r["evidence"] for r in crit), "every verdict carries its evidence")'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 06 demo

NB06 = nb([
    new_markdown_cell("# 06 · DINO-swap demo\n\nText from one scene, DINO (CLS + patches) from another: whose "
                      "layout and colours does the image follow? The widgets below call the same function "
                      "(`nbcore.demo.Demo.swap`) as the headless grid. The checkpoint defaults to the newest "
                      "patch model of a notebook run (this run folder first), else a quick tiny model is "
                      "trained for the demo."),
    *header("06_dino_swap_demo",
            "ckpt = None          # a checkpoint path, or None: the newest patch model found (else train a quick one)\n"
            "demo_steps = None\ntext_scale = None\ndino_scale = None\ndemo_grid = None     # pairs in the headless grid\n"
            "demo_train_steps = None\nwidgets = True       # build the interactive panel (needs a live kernel to react)\n",
            train=True),
    new_code_cell('''from nbcore.demo import Demo, swap_figure, build_widget
demo = Demo.load(ckpt, run_dir=ctx.run_dir, device=ctx.device, n_scenes=max(8, 2 * s["demo_grid"]),
                 train_steps=s["demo_train_steps"], preset=s["preset"], seed=ctx.seed,
                 variant=suite.patch_variant(s["patch_pos"]))
print("checkpoint:", demo.info)
ctx.metrics["checkpoint"] = demo.info["path"]
ctx.metrics["checkpoint_step"] = demo.info["step"]'''),
    new_markdown_cell("## Headless: the default swap grid\nPair i takes the text of scene i and the DINO of "
                      "scene i + n (different scenes)."),
    new_code_cell('''n = s["demo_grid"]
res = demo.swap(list(range(n)), list(range(n, 2 * n)), s["text_scale"], s["dino_scale"], s["demo_steps"], seed=ctx.seed)
ctx.save(swap_figure(res), "swap_grid.png")
m = res["metrics"]
print(m)
ctx.metrics.update({f"swap_{k}": v for k, v in m.items()})
import torch
ctx.check(all(torch.isfinite(x).all() for x in res["images"].values()), "swap images are finite")
ctx.check(res["images"]["swap"].shape == res["images"]["text_source"].shape, "swap images have the source shape")'''),
    new_markdown_cell("## Interactive\nChange the sources, guidance scales, steps or seed: the image re-renders."),
    new_code_cell('''panel = None
if widgets:
    panel = build_widget(demo, text_index=0, dino_index=1, text_scale=s["text_scale"], dino_scale=s["dino_scale"],
                         steps=s["demo_steps"], seed=ctx.seed)
    ctx.check(len(panel.image.value) > 0, "the widget rendered an image")
panel'''),
    new_code_cell("ctx.finish()"),
])

BOOKS = {"01_architecture": NB01, "02_checks": NB02, "03_training": NB03, "04_attention_routing": NB04,
         "05_milestones": NB05, "06_dino_swap_demo": NB06}


def main() -> None:
    for name, book in BOOKS.items():
        nbformat.validate(book)
        nbformat.write(book, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
