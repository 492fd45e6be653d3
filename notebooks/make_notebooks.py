"""Write the suite's notebooks (nbformat v4) from the cell sources below.

    .venv/bin/python notebooks/make_notebooks.py        # rewrites notebooks/NN_*.ipynb

The notebooks are thin: every non-trivial cell calls nbcore (``nbcore.experiment`` for the profile,
data, training and evaluation, ``nbcore.notebooks`` for the context, ``nbcore.checks``, ``nbcore.analysis``, ``nbcore.demo``; plots from
``nbcore.viz``). The first code cell of each is tagged ``parameters`` for papermill; ``None``
means "the profile's value" (``nbcore.experiment.PROFILES``).
"""
from __future__ import annotations

from pathlib import Path

import dataclasses

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nbcore.experiment import Profile

HERE = Path(__file__).resolve().parent

COMMON = '''profile = "cpu"       # smoke | cpu | cpu-fine | cpu-long | gpu (fields left None come from nbcore.experiment.PROFILES)
device = "auto"       # auto | cpu | cuda
run_dir = None        # None: REPO/outputs/runs/PROFILE (the runner passes its run folder)
seed = 0
fail_check = False    # True adds a deliberately failing check (tests the failure path)
preset = None         # model preset: micro | tiny | production
model_overrides = None   # dict of ModelConfig fields over the preset, e.g. {"depth": 2}
'''

# The run's data and schedule knobs (nbcore.experiment.Profile fields): declared by every notebook
# that may train (03-06), so a command-line value reaches all of them and they agree on the models.
TRAIN = '''n_data = None         # shapes-world samples (train + val)
batch_size = None
steps = None          # optimiser steps of every arm (equal for all)
warm_from = None      # baseline step the warm-started arms branch from
milestone_every = None
lr = None
arms = None           # arm names (nbcore.experiment.HEADLINE_ARMS / SECONDARY_ARMS); the first is the baseline
seeds = None          # training seeds of every arm
warmup = None         # linear lr warm-up steps of every arm
ema_decay = None
warm_lr_scale = None  # lr factor of the warm arms (TrainConfig.warm_start_lr_scale; the design suggests 0.5)
new_param_lr_scale = None   # extra lr factor of the parameters the pre-patch model lacks, warm arms only
world = None          # shapes-world rules: standard | easy
val_fraction = None   # held-out share of the shapes world
workers = None        # training / scoring processes at a time on a CPU
n_boot = None         # bootstrap resamples of every interval
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
    fields = {f.name for f in dataclasses.fields(Profile)}
    given = ", ".join(f"{k}={k}" for k in names if k not in CTX_ARGS and k in fields)
    start = ("from nbcore import notebooks as suite, experiment as ex, viz\n"
             f"ctx = suite.start({name!r}, profile=profile, run_dir=run_dir, device=device, seed=seed, fail_check=fail_check,\n"
             f"                  {given})\n"
             "p = ctx.p\n"
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
    new_markdown_cell("## Both presets\n`production` is the full-size model; `tiny` is the shapes world on a CPU. "
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
    new_code_cell('''pc = summaries["production"]["context"]
ctx.save(viz.plot_context_layout(pc["text"], pc["cls"], pc["patches"], n_real_text=60), "context_production.png")
t = summaries["tiny"]["context"]
ctx.save(viz.plot_context_layout(t["text"], t["cls"], t["patches"], n_real_text=12), "context_tiny.png")'''),
    new_markdown_cell("## Parameter counts and the new parameters"),
    new_code_cell('''counts = {n: architecture_summary(PRESETS[n]) for n in ("nano", "tiny", "production")}   # nano: the suite's preset
table = {"parameters": {f"{n} {label}": counts[n][f"params_{v}"] for n in counts
                        for v, label in (("prepatch", "pre-patch"), ("patch", "patch"))}}
ctx.save(viz.bar_table(table, title="parameters: pre-patch vs patch model, per preset (nano runs the cpu experiment)",
                       logy=True, units={"parameters": "parameters (count, log scale)"}), "param_counts.png")
rows = [r for n in summaries for r in summaries[n]["new_table"]]
ctx.save(viz.plot_table(rows, title="parameters the patch model adds (warm start initialises these)"), "new_parameters.png")
for r in rows:
    print(r)'''),
    new_markdown_cell("## The four CFG modes\nEach training sample draws one mode; the sampler combines the four "
                      "branches in one batched forward (`nbcore.sample.Guidance`, formulas in its docstring)."),
    new_code_cell('''from nbcore.checks import cfg_modes
from nbcore.model import preset as model_preset
modes = cfg_modes(model_preset("tiny"), text_scale=p.text_scale, dino_scale=p.dino_scale)   # cheap at any profile
ctx.save(viz.plot_table(modes["table"], title="CFG modes: what each branch sees"), "cfg_modes.png")
ctx.save(viz.plot_table(modes["coefficients"], title=f"guidance coefficients (s_t={p.text_scale}, s_d={p.dino_scale})"),
         "guidance_coefficients.png")
for r in modes["table"]:
    print(r)
ctx.check(all(r["dropped input has no influence"] for r in modes["table"]), "each CFG mode ignores what it drops")
ctx.check(modes["distinct"], "the four modes give four different outputs (perturbed tiny model)")'''),
    new_markdown_cell("## Content against position in a context patch key\nOn this run's data (normalised with its "
                      "`stats.json`), through a patch arm's projection at initialisation: the norm of the projected "
                      "content of each patch without and with `patch_norm` (percentiles over every patch of 64 "
                      "validation scenes), against the norm of the sin-cos position added to it. A content norm far "
                      "above the position's drowns the position; `patch_norm` gives every patch the norm sqrt(D)."),
    new_code_cell('''import torch
from nbcore import analysis
from nbcore.model import NanoDiT
data_dir = ex.ensure_data(p, ctx.run_dir, ctx.seed)
val = suite.load_val_batch(data_dir, 64)
torch.manual_seed(0)
arm_cfg = p.model_config(ex.Arm("patch-sincos", {"patch_pos_embed": "sincos"}))
norms = analysis.patch_token_norms(NanoDiT(arm_cfg), val["dino_patches"])
rows = [{"what": "content, raw projection", **{k: f"{v:.2f}" for k, v in norms["content"].items()}},
        {"what": "content, patch_norm", **{k: f"{v:.2f}" for k, v in norms["content_normed"].items()}},
        {"what": "sin-cos position", "p10": "", "p50": f"{norms['position']:.2f}", "p90": "", "max": ""}]
ctx.save(viz.plot_table(rows, title=f"context patch key: content vs position norm (D={arm_cfg.hidden_size}, {p.name} data)"),
         "patch_content_vs_position.png")
for r in rows:
    print(r)
print(f"adjacent positions: 1 - cosine = {norms['neighbour_distinct']:.3f}")
ctx.metrics["patch_token_norms"] = norms
ctx.check(abs(norms["content_normed"]["p50"] - arm_cfg.hidden_size ** 0.5) < 0.01 * arm_cfg.hidden_size ** 0.5,
          "patch_norm gives every context patch the content norm sqrt(D)")'''),
    new_markdown_cell("## A production-size forward (B = 1)"),
    new_code_cell('''from nbcore.checks import production_forward as prod_fwd
run_prod = production_forward if production_forward is not None else p.name != "smoke"
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
check_cfg = model_preset(check_preset) if check_preset else p.model_config()
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
    new_markdown_cell("# 03 · Training\n\nThe shapes world (made once per run folder) and every arm of the "
                      "experiment under one schedule (`nbcore.experiment`): the pre-patch baseline from scratch, "
                      "the patch arms warm-started from the same seed's baseline milestone at `warm_from`, patch arms "
                      "from scratch, every arm with `seeds` training seeds. Every arm gets the "
                      "same number of optimiser steps. Runs go two at a time, one thread each; progress lines "
                      "also reach the runner's terminal."),
    *header("03_training", train=True),
    new_markdown_cell("## The shapes world"),
    new_code_cell('''data_dir = ex.ensure_data(p, ctx.run_dir, ctx.seed)
val = suite.load_val_batch(data_dir, 6)
import textwrap
ctx.save(viz.image_grid({textwrap.fill(c, 24): val["png"][i:i + 1] for i, c in enumerate(val["txt"])}, size=2.0),
         "shapes_world.png")
print(data_dir, *val["txt"], sep="\\n")'''),
    new_markdown_cell("## Every arm, equal steps"),
    new_code_cell('''from nbcore.analysis import fmt
summaries = ex.train_arms(p, ctx.run_dir, ctx.device, seed=ctx.seed)
arms = ex.runs(p)
for a in arms:
    sm = summaries[a.run]
    print(f"{a.run:24s} {a.init:8s} steps {sm['steps']:5d}  final loss {fmt(sm['final_loss'], 4)}  "
          f"{fmt(sm['steps_per_s'], 1)} steps/s  skipped {sm['skipped']}  reused {sm['reused']}")
    ctx.metrics[f"{a.run}_final_loss"] = sm["final_loss"]
    ctx.metrics[f"{a.run}_steps_per_s"] = sm["steps_per_s"]
    ctx.check((sm["final_loss"] is not None or sm["steps_this_run"] == 0) and sm["skipped"] == 0,
              f"{a.run}: finite loss, no non-finite step skipped")
    total = sm["steps"] + (p.warm_from if a.init == "warm" else 0)
    ctx.check(total == p.steps, f"{a.run}: {p.steps} optimiser steps in all", total=total)
warm = [a for a in arms if a.init == "warm"]
for a in warm:
    ev = [r for r in ex.load_train_log(ex.arm_dir(ctx.run_dir, a), kind="event") if r.get("event") == "warm_start"]
    ctx.check(ev and not ev[-1]["mismatched"], f"{a.run}: warm start from its seed's baseline at step {p.warm_from}",
              new=ev[-1]["new"] if ev else None)'''),
    new_markdown_cell("## Loss curves\nOn the shared axis of total optimiser steps (a warm arm starts at `warm_from`)."),
    new_code_cell('''logs = ex.loss_curves(p, ctx.run_dir, arms)
smooth = max(1, min(len(r) for r in logs.values()) // 20)
ctx.save(viz.plot_curves(logs, ["loss", "grad_norm"], smooth=smooth, logy=["loss"], xlabel="total optimiser steps",
                         title=f"training, every arm ({p.name} profile; warm arms branch at step {p.warm_from})"),
         "curves_loss.png")
ctx.metrics["loss_by_bin"] = {a.run: summaries[a.run]["loss_by_bin"] for a in arms}
ctx.save(viz.plot_loss_by_bin(ctx.metrics["loss_by_bin"]), "loss_by_bin.png")'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 04 routing

NB04 = nb([
    new_markdown_cell("# 04 · Attention routing\n\nOn the best *context* arm (lowest reconstruction layout error "
                      "among arms whose patches reach the image only through the cross-attention, so any placement "
                      "must be routed there): where each image token's cross-attention goes (text, CLS, patches) "
                      "per block, head and timestep; whether an image token attends to its co-located patch, per "
                      "head and block and over training; whether CLS is attended at all."),
    *header("04_attention_routing", "routing_samples = None\nrouting_steps = None\n", train=True),
    new_code_cell('''from nbcore import analysis
from nbcore.sample import load_model
ex.train_arms(p, ctx.run_dir, ctx.device, seed=ctx.seed)
best = ex.best_patch_arm(p, ctx.run_dir, context_only=True) or ex.best_patch_arm(p, ctx.run_dir)
ckpts = ex.checkpoints(ctx.run_dir, best)
model = load_model(ckpts[-1][1], use_ema=True, device=ctx.device)
cfg = model.cfg
print("best context arm:", best.run, "checkpoint step", ckpts[-1][0], "context", cfg.context_order)
ctx.metrics["arm"] = best.run
batch = suite.load_val_batch(ctx.run_dir / "data", p.routing_samples, device=ctx.device)
z, rec = analysis.capture_sampling(model, batch, steps=p.routing_steps, seed=ctx.seed)
tabs = analysis.routing_tables(rec)
print("overall mass:", {k: round(v, 4) for k, v in tabs["overall"].items()})
ctx.check(abs(sum(tabs["overall"].values()) - 1) < 1e-4, "routing masses sum to 1", total=sum(tabs["overall"].values()))
ctx.metrics.update({f"mass_{k}": v for k, v in tabs["overall"].items()})'''),
    new_markdown_cell("## Mass per block and head"),
    new_code_cell('''ctx.save(viz.plot_routing_mass(tabs["per_block_head"], title=f"{best.run}: mass per block and head"), "mass_block_head.png")
ctx.save(viz.plot_mass_over_t(tabs["t"], tabs["per_t"]), "mass_over_t.png")
ctx.metrics["mass_per_block"] = tabs["per_block"]'''),
    new_markdown_cell("## Does an image token attend to its co-located patch?\nHead-averaged attention over the patch "
                      "grid of the last block at the last sampling step, for tokens under each shape's centre (the "
                      "cyan cross marks the token's own place); then the co-located share (1 = uniform) at every "
                      "milestone."),
    new_code_cell('''h = w = cfg.input_size // cfg.patch_size
has_maps = "patches" in cfg.context_order
if has_maps:
    maps = rec.patch_maps[-1, -1]                                   # (B, N, P): last step, last block
    for i in range(min(2, maps.shape[0])):
        q = analysis.query_tokens(batch["json"][i] if "json" in batch else None, h, w, n=4)
        ctx.save(viz.plot_patch_maps(batch["png"][i], maps[i].numpy(), (h, w), q, cfg.dino_grid,
                                     title=f"{best.run}, step {ckpts[-1][0]}: last block, last sampling step"), f"patch_maps_{i}.png")
    loc = analysis.patch_locality(rec.patch_maps, (h, w), cfg.dino_grid)
    print(loc)
    ctx.metrics.update({f"locality_{k}": v for k, v in loc.items()})
    over = analysis.cls_use(ckpts, batch, ctx.device)
    ctx.save(viz.plot_curves({src: [{"step": r["step"], "mass": r[src]} for r in over] for src in ("text", "cls", "patches")},
                             ["mass"], title=f"{best.run}: cross-attention mass per source over training",
                             xlabel="total optimiser steps"), "mass_over_training.png")
    ctx.metrics["mass_over_training"] = over
    loc_over = analysis.locality_over_training(ckpts, batch, p.routing_steps, ctx.device, seed=ctx.seed)
    ctx.save(viz.plot_curves({"head average": [{"step": r["step"], "ratio": r["ratio"]} for r in loc_over],
                              "most local head": [{"step": r["step"], "ratio": r["max_head_ratio"]} for r in loc_over]},
                             ["ratio"], title=f"{best.run}: co-located patch share over training",
                             refs={"ratio": [(1.0, "uniform (position-blind)")]}, xlabel="total optimiser steps"),
             "locality_over_training.png")
    last = loc_over[-1]
    ctx.save(viz.plot_head_heatmap(last["per_head"], f"{best.run}, step {last['step']}: co-located patch share / uniform",
                                   "share / uniform (1 = position-blind)"), "locality_per_head.png")
    print(f"most local head at step {last['step']}: {last['max_head_ratio']:.2f} x uniform (head average {last['ratio']:.2f})")
    ctx.metrics["locality_max_head"] = last["max_head_ratio"]
    print("co-located share / uniform over training:", [(r["step"], round(r["ratio"], 2)) for r in loc_over])
    ctx.metrics["locality_over_training"] = loc_over
    M = batch["text_mask"].sum(1).float().mean().item() + 1 + cfg.num_patches   # mean context length
    answer, share = analysis.cls_use_answer(over, tabs, loc, M)
    print(answer)
    ctx.metrics["cls_share_vs_uniform"] = share
    ctx.metrics["cls_use_answer"] = answer
else:
    print(f"{best.run} has no patches in its context (tied only): no patch maps")'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 05 results

NB05 = nb([
    new_markdown_cell("# 05 · Milestones and the answer\n\nEvery arm against two calibration rows and a "
                      "ceiling: `untrained` (a random-init model through the same sampler), `layout_blind` "
                      "(the right shapes at shuffled places: what *no layout* scores) and `oracle` (the "
                      "source through the codec). Layout is measured on shapes found as connected components "
                      "(`nbcore.metrics.shape_layout`): `layout_error` (centre distance, a missed shape costs "
                      "the mean distance of two random points, 0.52), `shape_recall`, `placement_error` (found "
                      "shapes only), `mask_iou`. Means with 95% bootstrap intervals over scenes; arm-vs-baseline "
                      "differences paired over the same scenes; guidance off and on. The sentences at the end "
                      "are written from the numbers by `nbcore.experiment.conclusions`."),
    *header("05_milestones", "curve_scenes = None\nfinal_scenes = None\nsample_steps = None\ntext_scale = None\n"
            "dino_scale = None\npatch_scales = None\n", train=True),
    new_code_cell('''from nbcore import analysis
ex.train_arms(p, ctx.run_dir, ctx.device, seed=ctx.seed)
arms = ex.runs(p)
print("arms:", [a.run for a in arms])'''),
    new_markdown_cell("## Curves: layout error against total optimiser steps\nGuidance off, `curve_scenes` "
                      "scenes, EMA weights of every milestone; the band is the 95% interval. The plateau test "
                      "comes with the final evaluation below (paired, on `final_scenes` scenes)."),
    new_code_cell('''curves = ex.curves(p, ctx.run_dir, arms, ctx.device)
res = ex.evaluate(p, ctx.run_dir, arms, ctx.device)          # cached: the reference rows of the figures
rows_on = res["rows"]
refs = [(rows_on["layout_blind"]["on"]["recon"]["layout_error"]["mean"], "layout blind (right shapes, wrong places)"),
        (rows_on["untrained"]["on"]["recon"]["layout_error"]["mean"], "untrained"), (0.0, "oracle")]
branch = [(p.warm_from, f"warm arms branch (step {p.warm_from})")]
for mode in ("recon", "textonly"):
    ctx.save(viz.plot_ci_curves(curves, mode, "layout_error", refs=refs, vlines=branch,
                                title=f"{p.name}: {mode} layout error, guidance off, {p.curve_scenes} scenes"),
             f"curve_{mode}_layout_error.png")
ctx.save(viz.plot_ci_curves(curves, "recon", "shape_recall", vlines=branch,
                            title=f"{p.name}: recon shape recall, guidance off"), "curve_recon_recall.png")
ctx.metrics["curves"] = curves'''),
    new_markdown_cell("## Final evaluation: calibration rows and every arm"),
    new_code_cell('''res = ex.evaluate(p, ctx.run_dir, arms, ctx.device)
for metric in ex.LAYOUT_METRICS:
    table = ex.results_table(res, metric)
    ctx.save(viz.plot_table(table, title=f"{metric}: mean [95% interval], {p.final_scenes} scenes"), f"table_{metric}.png")
    print(f"\\n{metric}")
    for r in table:
        print("  ".join(f"{v:>28s}" if i else f"{v:22s}" for i, v in enumerate(r.values())))
ctx.save(viz.plot_ci_bars(res, "layout_error", modes=("recon", "textonly", "dinoonly"), refs=refs[:1],
                          title=f"{p.name}: layout error at step {p.steps}, {p.final_scenes} scenes",
                          guidance=f"guided = nested, text {p.text_scale:g} / DINO {p.dino_scale:g}"), "final_layout_error.png")
swap = {row: res["rows"][row]["on"]["swap_dino"]["layout_error"]["mean"] for row in res["rows"]}
print("\\nDINO swap (guidance on): layout error against the DINO source's scene", {k: analysis.fmt(v) for k, v in swap.items()})
ctx.metrics["eval"] = res
plateaus = {a.run: ex.plateau(res, a.run) for a in arms}
for run, pl in plateaus.items():
    print(f"{run:28s} last-step change {ex._d(pl['diff']) if 'diff' in pl else pl.get('why')}  "
          f"{'still improving (a floor)' if pl['still_improving'] else 'plateau'}")
ctx.metrics["plateau"] = plateaus
ctx.check(res["rows"]["oracle"]["on"]["recon"]["layout_error"]["mean"] < 0.02, "oracle row is near 0 (the metric's ceiling)")
ctx.check(res["rows"]["layout_blind"]["on"]["recon"]["layout_error"]["mean"] > 0.2, "layout-blind row is far from 0")'''),
    new_markdown_cell("## Seeds\nEvery arm with every seed, each against its own seed's baseline: the seed-to-seed "
                      "spread beside the intervals over scenes."),
    new_code_cell('''best = ex.best_patch_arm(p, ctx.run_dir)
ctx.metrics["best_patch_arm"] = best.run
for arm, seeds_ in ex.seed_groups(res).items():
    for run in seeds_:
        r, d = res["rows"][run]["on"], res["diffs"].get(run)
        diff = f"  recon - baseline {ex._d(d['on']['recon']['layout_error'])}" if d else ""
        print(f"{run:28s} recon {ex._ci(r['recon']['layout_error'])}  text-only {ex._ci(r['textonly']['layout_error'])}{diff}")'''),
    new_markdown_cell("## Separate patch guidance scale\nNested guidance with the CLS-only "
                      "branch: `v_u + s_d (v_cls - v_u) + s_p (v_dino - v_cls) + s_t (v_full - v_dino)`. Caveat: "
                      "(real CLS, null patches) never occurs in training with the default dropout."),
    new_code_cell('''if "patches" in p.model_config(best).context_order or p.model_config(best).patch_tie:
    sweep = ex.patch_scale_sweep(p, ctx.run_dir, best, ctx.device)
    for r in sweep:
        print(f"{best.run} patch scale {r['patch_scale']:.1f}: layout error {ex._ci(r['layout_error'])}, recall {ex._ci(r['shape_recall'])}")
    ctx.metrics["patch_scale_sweep"] = {"arm": best.run, "rows": sweep}'''),
    new_markdown_cell("## What each arm draws\nThe first 8 validation scenes, one shared noise draw, guidance on "
                      "(reconstruction), every run at its last milestone; then the same scenes over the milestones "
                      "of the baseline and of the best patch arm; then the best arm's worst-scoring scenes beside "
                      "their sources."),
    new_code_cell('''pics = ex.pictures(p, ctx.run_dir, arms, n=8, device=ctx.device)
ctx.save(viz.sample_grid(pics["rows"], pics["source"], pics["captions"],
                         f"reconstruction, guidance on (text {p.text_scale} / DINO {p.dino_scale}), step {p.steps}, shared noise"),
         "samples_by_arm.png")
for a in (ex.BASELINE, best):
    over = ex.pictures_over_training(p, ctx.run_dir, a, n=8, device=ctx.device)
    ctx.save(viz.sample_grid(over["rows"], over["source"], over["captions"], f"{a.run}: reconstruction over training (guidance on)"),
             f"samples_over_training_{a.run}.png")
worst = ex.worst_scenes(p, ctx.run_dir, best, k=8, device=ctx.device)
ctx.save(viz.sample_grid(worst["rows"], worst["source"], worst["captions"],
                         f"{best.run}: its 8 worst scenes of {p.final_scenes} (layout error, guidance on)"), "worst_scenes.png")'''),
    new_markdown_cell("## What the numbers say"),
    new_code_cell('''sentences = ex.conclusions(res)
for line in sentences:
    print("-", line)
ctx.metrics["conclusions"] = sentences
ctx.check(len(sentences) >= 1, "the notebook states what the numbers support")'''),
    new_code_cell("ctx.finish()"),
])

# --------------------------------------------------------------------------- 06 demo

NB06 = nb([
    new_markdown_cell("# 06 · DINO-swap demo\n\nText from one source, DINO (CLS + patches) from another: whose "
                      "layout does the image follow? The widgets below call the same function "
                      "(`nbcore.demo.Demo.swap`) as the headless grid. The model defaults to this run's best "
                      "patch arm (trained by notebook 03); `ckpt` takes a training checkpoint or a "
                      "`save_pretrained` folder.\n\n"
                      "Sources are shapes-world scenes, plus your own material: `images` (files, DINO sources) "
                      "and `captions` (typed text, text sources), encoded by the encoders the model's data was "
                      "made with: the shapes world's stand-ins, or the real DINOv3 / T5 / VAE from the folders "
                      "its stats.json records (`dino_dir`, `t5_dir`, `vae_dir` override them). The layout "
                      "metric needs a scene: a typed caption or a photo is not scored."),
    *header("06_dino_swap_demo",
            "ckpt = None          # a training checkpoint or a save_pretrained folder; None: this run's best patch arm\n"
            "dino_dir = None      # real encoders' local folders; None: those the model's data recorded\n"
            "t5_dir = None\nvae_dir = None\n"
            "images = []          # your image files: DINO sources (empty: the shapes world's scenes only)\n"
            "captions = []        # your typed captions: text sources (the i-th goes with the i-th image)\n"
            "demo_steps = None\ntext_scale = None\ndino_scale = None\ndemo_grid = None     # pairs in the headless grid\n"
            "widgets = True       # build the interactive panel (needs a live kernel to react)\n",
            train=True),
    new_code_cell('''from nbcore.demo import Demo, swap_figure, build_widget
from nbcore.pipeline import NanoDiTPipeline
model_name = ckpt
if ckpt is None:
    ex.train_arms(p, ctx.run_dir, ctx.device, seed=ctx.seed)
    best = ex.best_patch_arm(p, ctx.run_dir)
    total_step, ckpt = ex.checkpoints(ctx.run_dir, best)[-1]   # total optimiser steps, as notebooks 04 and 05
    model_name = f"{best.run} at step {total_step}"
demo = Demo.load(ckpt, device=ctx.device, n_scenes=max(8, 2 * p.demo_grid), world_seed=ctx.seed,
                 dino=dino_dir, t5=t5_dir, vae=vae_dir)
mine = demo.add_material(images, captions)
print(f"model {model_name}: {demo.info['path']} ({demo.info['format']}); {demo.encoders.kind} encoders")
print(f"{len(demo.sources)} sources, yours: {[demo.sources[i].label for i in mine]}")
ctx.metrics["checkpoint"] = str(demo.info["path"])
ctx.metrics["checkpoint_step"] = demo.info["step"]
ctx.metrics["encoders"] = demo.encoders.kind
ctx.metrics["user_sources"] = len(mine)'''),
    new_markdown_cell("## Headless: the swap grid\nWithout your material, pair i takes the text of scene i and the "
                      "DINO of scene i + n (different scenes); with it, your captions meet your images "
                      "(`Demo.grid_pairs`)."),
    new_code_cell('''text_idx, dino_idx = demo.grid_pairs(p.demo_grid)
res = demo.swap(text_idx, dino_idx, p.text_scale, p.dino_scale, p.demo_steps, seed=ctx.seed)
ctx.save(swap_figure(res, title=f"{model_name}; nested guidance text {p.text_scale:g} / DINO {p.dino_scale:g}, "
                                f"{p.demo_steps} Euler steps, seed {ctx.seed}"), "swap_grid.png")
m = res["metrics"]
print(m)
ctx.metrics.update({f"swap_{k}": v for k, v in m.items()})
import torch
ctx.check(all(torch.isfinite(x).all() for x in res["images"].values()), "swap images are finite")
ctx.check(res["images"]["swap"].shape == res["images"]["dino_source"].shape, "swap images have the source shape")'''),
    new_markdown_cell("## One call: the pipeline\n`NanoDiTPipeline.from_pretrained(model)` (a model folder or a "
                      "checkpoint) holds the model, its data's encoders and codec; `pipe(caption, dino_image=...)` "
                      "returns images (PIL), seeded, with the guidance scales as arguments. The same call as "
                      "`nbcore-generate MODEL \"caption\" --dino-image IMG`."),
    new_code_cell('''pipe = NanoDiTPipeline.from_pretrained(ckpt, dino=dino_dir, t5=t5_dir, vae=vae_dir, device=ctx.device)
caption = demo.sources[text_idx[0]].caption
dino_image = demo.image_of(demo.sources[dino_idx[0]])                   # (3, S, S): a path or a PIL image work too
out = pipe(caption, dino_image=dino_image, seed=ctx.seed, steps=p.demo_steps, text_scale=p.text_scale,
           dino_scale=p.dino_scale, num_images=2)
print(f"{len(out)} images of {out[0].size} px for {caption!r}")
import numpy as np
ctx.check(len(out) == 2 and out[0].size == (pipe.encoders.image_size,) * 2, "the pipeline returns the asked images")
ctx.check(all(np.isfinite(np.asarray(im, dtype=float)).all() for im in out), "pipeline images are finite")
out[0]'''),
    new_markdown_cell("## Interactive\nChange the sources (or type a caption, or give an image file), guidance "
                      "scales, steps or seed: the image re-renders."),
    new_code_cell('''panel = None
if widgets:
    panel = build_widget(demo, text_index=text_idx[0], dino_index=dino_idx[0], text_scale=p.text_scale,
                         dino_scale=p.dino_scale, steps=p.demo_steps, seed=ctx.seed)
    ctx.check(len(panel.image.value) > 0, "the widget rendered an image")
panel'''),
    new_code_cell("ctx.finish()"),
])


# --------------------------------------------------------------------------- 07 real data

NB07 = nb([
    new_markdown_cell("# 07 · Real data: a folder of images and captions, end to end\n\n"
                      "Images + captions → `nbcore.encoders.precompute` (DINOv3, T5, VAE from local folders) → a short "
                      "training run (condition sizes read from the shards' `stats.json`) → validation decoded with the "
                      "data's VAE (PSNR, LPIPS when its weights are there, the DINO-space layout score) → a DINO swap "
                      "from two image files and a typed caption → a shareable model folder (`save_pretrained`).\n\n"
                      "**Left at their defaults (None), the encoder folders are PLUMBING STAND-INS**: tiny randomly "
                      "initialised models of the real classes (`nbcore.encoders.tiny_random_encoders`), and the images "
                      "are generated shapes-world scenes. That run checks that the path works; its numbers mean "
                      "nothing. Point `dino_dir`, `t5_dir`, `vae_dir` and `images_dir` at real folders for a real run."),
    *header("07_real_data",
            "dino_dir = None      # local DINOv3 ViT folder (transformers); None: plumbing stand-ins for all three\n"
            "t5_dir = None        # local T5 encoder + tokenizer folder\n"
            "vae_dir = None       # local AutoencoderKL folder (diffusers)\n"
            "images_dir = None    # name.jpg|png|webp + name.txt captions; None: generated shapes-world scenes\n"
            "real_preset = \"tiny\"   # model preset: hidden size, depth, heads (sizes of the conditions come from the data)\n"
            "real_images = None\nreal_image_size = None\nreal_steps = None\n"
            "swap_caption = None  # typed caption for the swap (None: the first validation caption)\n"),
    new_code_cell('''from pathlib import Path
from nbcore import encoders, shapes
real = ctx.out
plumbing = dino_dir is None
if plumbing:
    dirs = encoders.tiny_random_encoders(real / "encoders")
    dino_dir, t5_dir, vae_dir = dirs["dino"], dirs["t5"], dirs["vae"]
    print("PLUMBING STAND-INS: tiny random DINOv3 / T5 / VAE in", real / "encoders", "- numbers below mean nothing")
elif t5_dir is None or vae_dir is None:
    raise ValueError("give all three encoder folders (dino_dir, t5_dir, vae_dir) or none")
if images_dir is None:
    images_dir = shapes.write_image_folder(real / "images", p.real_images, image_size=p.real_image_size, rules=p.world)
ctx.metrics["plumbing"] = plumbing'''),
    new_markdown_cell("## Precompute\nResumable: a rerun keeps the finished shards."),
    new_code_cell('''shards = real / "shards"
pre = encoders.precompute(images_dir, shards, dino_dir, t5_dir, vae_dir, image_size=p.real_image_size,
                          batch_size=16, shard_size=64, val_fraction=0.25, seed=ctx.seed, device=ctx.device)
print({k: v for k, v in pre.items() if k != "unreadable_files"})
ctx.metrics["precompute"] = {k: pre[k] for k in ("train", "val", "unreadable", "skipped_no_caption", "images_per_s")}
ctx.check(pre["train"] > 0 and pre["val"] > 0, "precompute wrote train and val samples", train=pre["train"], val=pre["val"])'''),
    new_markdown_cell("## Train\nThe latent, text and DINO sizes come from `stats.json`; the preset gives the rest."),
    new_code_cell('''from nbcore.train import TrainConfig, train, load_train_log
run = train(TrainConfig(preset=real_preset, data=str(shards), out=str(real / "train"), steps=p.real_steps,
                        batch_size=min(p.batch_size, pre["train"]), lr=p.lr, warmup=min(p.warmup, p.real_steps // 5),
                        schedule="constant", ema_decay=p.ema_decay, device=ctx.device, seed=ctx.seed,
                        log_every=max(1, p.real_steps // 20), ckpt_every=p.real_steps))
ckpt = run["checkpoint"]
log = load_train_log(real / "train" / "log.jsonl")
ctx.save(viz.plot_curves({"real data": log}, ["loss"], title="real-data training" + (
    " on PLUMBING STAND-INS (random encoders: the curve means nothing)" if plumbing else "")), "loss.png")
ctx.metrics["train"] = {"steps": run["steps"], "final_loss": run["final_loss"]}
ctx.check(run["steps"] == p.real_steps, "trained the planned steps", steps=run["steps"])'''),
    new_markdown_cell("## Validation\nDecoded with the data's VAE. Metrics for any data: PSNR and LPIPS against the "
                      "source image, and the DINO-space layout score (generated and source images re-encoded with the "
                      "data's DINOv3, patch maps compared position by position; 1 = the source's map) between its "
                      "chance rows (the source's own grid rolled by half: right content, wrong places; another image) "
                      "and its ceiling (the codec round trip). Shape-layout metrics need shapes-world scene metadata."),
    new_code_cell('''from nbcore.validate import validate_checkpoint
val = validate_checkpoint(ckpt, shards, out_dir=real / "validate", n=min(16, pre["val"]), steps=p.sample_steps,
                          seed=ctx.seed, device=ctx.device, dino=dino_dir, vae=vae_dir, progress=False)
keys = ["recon_psnr", "recon_lpips", "recon_dino_layout_corr", "textonly_dino_layout_corr", "dino_layout_corr_rolled",
        "dino_layout_corr_other_image", "dino_layout_corr_codec_roundtrip", "recon_layout_error", "textonly_layout_error"]
for k in keys:
    print(f"{k:36s} {val.get(k)}")
print("shapes-world only:", val["shapes_world_only"], "|", val["layout_status"], "|", val["lpips_status"])
ctx.metrics["validation"] = {k: val.get(k) for k in keys}
from IPython.display import Image, display
display(Image(filename=val["figure"]))
ctx.check(val["recon_psnr"] is not None and val["recon_dino_layout_corr"] is not None,
          "validation scored the real-data metrics", psnr=val["recon_psnr"], dino_layout=val["recon_dino_layout_corr"])'''),
    new_markdown_cell("## DINO swap from two image files and a typed caption\n"
                      "The DINO of each image file with the caption of the other (and the typed caption), through "
                      "`nbcore.demo.Demo` on the encoders the data was made with."),
    new_code_cell('''import torch
from nbcore.demo import Demo, swap_figure
files = sorted(Path(images_dir).glob("*.png")) + sorted(Path(images_dir).glob("*.jp*g"))
a, b = files[0], files[1]
demo = Demo.load(ckpt, device=ctx.device, dino=dino_dir, t5=t5_dir, vae=vae_dir, n_scenes=0)
ia, ib = demo.add_source(a, a.with_suffix(".txt").read_text().strip()), demo.add_source(b, b.with_suffix(".txt").read_text().strip())
typed = demo.add_source(caption=swap_caption or demo.sources[ia].caption)
res = demo.swap([ia, ib, typed], [ib, ia, ib], p.text_scale, p.dino_scale, p.demo_steps, seed=ctx.seed)
ctx.save(swap_figure(res), "swap_grid.png")
ctx.metrics["swap"] = res["metrics"]
print(res["metrics"])
ctx.check(all(torch.isfinite(x).all() for x in res["images"].values()), "swap images are finite")
ctx.check(res["images"]["swap"].shape[-1] == res["images"]["dino_source"].shape[-1], "swap images have the source size")'''),
    new_markdown_cell("## A shareable model\n`save_pretrained`: config.json, EMA weights as model.safetensors, the data "
                      "statistics and a model card; `from_pretrained` gives back the same outputs."),
    new_code_cell('''import torch
from nbcore.pretrained import save_pretrained, from_pretrained
from nbcore.sample import load_model
model_dir = save_pretrained(ckpt, real / "model", metrics=ctx.metrics["train"])
shared, info = from_pretrained(model_dir, device=ctx.device)
ref = load_model(ckpt, device=ctx.device)
batch = suite.load_val_batch(shards, 4, device=ctx.device)
cond = {k: batch[k] for k in ("dino_emb", "dino_patches", "text_emb", "text_mask")}
t = torch.full((len(batch["txt"]),), 0.5, device=ctx.device)
with torch.no_grad():
    same = torch.equal(shared(batch["latent"], t, **cond), ref(batch["latent"], t, **cond))
ctx.check(same, "from_pretrained gives the checkpoint's EMA outputs")'''),
    new_markdown_cell("## The model card's samples\n`nbcore.pipeline.write_card_samples` (what `nbcore-generate MODEL "
                      "--card` runs): the data's first images as DINO sources with their captions, text + DINO and "
                      "text only, through `NanoDiTPipeline`; the card links `samples.png`."),
    new_code_cell('''from nbcore.pipeline import write_card_samples
card_png = write_card_samples(model_dir, steps=p.demo_steps, seed=ctx.seed, device=ctx.device)
ctx.keep(card_png, "model_card_samples.png")
card = (model_dir / "README.md").read_text()
ctx.check("samples.png" in card, "the model card links its sample grid")
ctx.check(not plumbing or "Plumbing stand-ins" in card, "a model trained on plumbing stand-ins says so in its card")
print(card)'''),
    new_code_cell("ctx.finish()"),
])


BOOKS = {"01_architecture": NB01, "02_checks": NB02, "03_training": NB03, "04_attention_routing": NB04,
         "05_milestones": NB05, "06_dino_swap_demo": NB06,
         "07_real_data": NB07}


def main() -> None:
    for name, book in BOOKS.items():
        nbformat.validate(book)
        nbformat.write(book, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
