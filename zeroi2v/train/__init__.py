"""Training, evaluation and the offline demo (``zeroi2v train|eval|demo``).

    load_config(path, overrides)   defaults <- YAML <- ``key.sub=value`` overrides
    train(cfg, resume=None)        AdamW + warm-up/cosine, AMP, accumulation, DDP, resumable checkpoints
    evaluate(model, dataset, ...)  top-1/top-5/mean class accuracy, softmax averaged over views
    build_model(cfg.model, k)      a ZeroI2VViT from a config's model section
    load_model_and_run_config(path)  (model, run config, artefact) of a saved model or checkpoint
    video_views(path, cfg)         one video's test-time views (V, C, T, H, W), as eval makes them
    run_demo(...)                  the synthetic image-only vs STDHA demo
"""
from .build import build_model, load_model_and_run_config, video_views
from .config import DEFAULTS, RunConfig, apply_overrides, load_config
from .engine import train
from .evaluation import evaluate, write_eval_report
from .metrics import classification_metrics
from .optim import build_optimizer, build_scheduler, param_groups


def run_demo(*args, **kwargs):
    from .demo import run_demo as _run

    return _run(*args, **kwargs)


__all__ = ["DEFAULTS", "RunConfig", "load_config", "apply_overrides", "train", "evaluate",
           "write_eval_report", "build_model", "load_model_and_run_config", "classification_metrics",
           "build_optimizer", "build_scheduler", "param_groups", "run_demo", "video_views"]
