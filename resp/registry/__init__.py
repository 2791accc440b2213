"""The MLflow model registry: lineage of every pruned model, and its audit (after method step 10).

One registered model per (base model, task, method), `resp-{base}-{task}-{method}`, holds one version
per saved sparsity; the dense base model is `resp-{base}-dense`, each pruned version's `parent`. A
version's run holds the mask and its manifest, the run's summary, every trace set it calibrated on
(also logged as MLflow inputs), the exports, the metrics, the params and `lineage.json` (the sha256 of
every logged file and the local path it came from, and `run_cost`: what its pruning run spent, by step
kind, also logged as `run_cost.*` metrics); its tags repeat the searchable keys, so lineage
answers both ways. A version is created only after its files are logged and verified; a half-made run
is deleted, a version left by a killed registration is withdrawn by the next one. The same files
registered again give back the existing version. The only part of `resp` that imports MLflow:

    store.py     the tracking store, the experiment, model names
    versions.py  create / verify / withdraw a version; commit and DVC stage of what is registered
    register.py  a pruning run's masks (`resp register`)      healed.py   a healed model
    queries.py   `audit`: lineage of a version, every digest checked; reverse queries by trace set
    restore.py   missing recorded files fetched back from DVC
"""

from resp.registry.queries import audit, latest_base, lineage_lines, versions_with_traces
from resp.registry.healed import HEAL_MANIFEST, HEALED_MASK_DIR, register_healed
from resp.registry.register import mask_files, register_dense, register_method
from resp.registry.restore import fetch_file
from resp.registry.store import LINEAGE, RegistryError, dense_model_name, model_name, tracking_uri

__all__ = ["HEAL_MANIFEST", "HEALED_MASK_DIR", "LINEAGE", "RegistryError", "audit", "dense_model_name", "fetch_file",
           "latest_base", "lineage_lines", "mask_files", "model_name", "register_dense", "register_healed",
           "register_method", "tracking_uri", "versions_with_traces"]
