"""`bebop demo`: the five findings of DESIGN §6 reproduced end to end on a laptop, with plots.

Stages (each cached in ``cfg.out``, see :mod:`.pipeline`):
  1. sft      SFT policy (``policy/``), or an existing one with ``model=DIR``
  2. heads    MTP heads: a forward-KL warm start, then CE and e2e-TV (and ``extra_losses``) fine-tuned from it
              with identical data, step budget and LR, so the comparison isolates the loss; each stops early on
              held-out expected α
  3. losses   RS and TO acceptance α_k of every head through the engine at τ = ``temperature``
  4. sweep    RS vs TO accept length of the CE and e2e-TV heads over τ, fitted against the policy's entropy
  5. entropy  per-token entropy buckets and fits, and the RS-vs-TO decision-boundary check
  6. rl       short GRPO runs side by side (``bench_rl``): none, to-ce, rs-ce, rs-e2e_tv, rs-online-ce
  7. report   PNG plots, ``report.md`` and ``summary.json`` with a verdict per claim (held / not held /
             inconclusive, from bootstrap CIs)
  (ablations) with ``ablations`` (``--ablations``), before the report: head-training variants (γ_train, budget,
             data temperature) measured on the same prompts as stage 3 (:mod:`.ablations`)

Modules: :mod:`.config` (settings and the stage configs derived from them), :mod:`.pipeline` (the stages),
:mod:`.ablations` (the variants and their paired figures),
:mod:`.claims` (the verdict rules, pure functions) and :mod:`.report` (plots and ``report.md``).
"""

from bebop.experiments.demo.claims import CLAIMS, evaluate_claims
from bebop.experiments.demo.config import ABLATIONS, QUICK, DemoConfig, quick_config
from bebop.experiments.demo.pipeline import run_demo
from bebop.experiments.demo.report import PLOTS

__all__ = ["ABLATIONS", "CLAIMS", "PLOTS", "QUICK", "DemoConfig", "evaluate_claims", "quick_config", "run_demo"]
