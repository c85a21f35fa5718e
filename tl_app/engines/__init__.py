"""Engines that run tl-app's heavy stages beyond this process.

tl-app schedules nothing itself: Ray Data runs feature extraction and batch
prediction (``ray_engine``), tf.distribute runs training across workers,
launched with TF_CONFIG or through Ray Train (``distributed``). Ray is an
optional extra and is imported only inside these engines, so the default
install stays lean.
"""

from __future__ import annotations

from tl_app.core.errors import TlAppError

RAY_EXTRA = "pip install 'tl-app[ray]'"


def require_ray():
    """The ray module, or a TlAppError that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise TlAppError(
            f"--engine ray needs Ray, which is not installed here ({exc}). "
            f"Install it with: {RAY_EXTRA}   (or use the default --engine local)."
        ) from None
    return ray


def connect(engine):
    """Join the Ray cluster named by ``engine.address`` (or start a local one); returns ray.

    "" starts a local instance unless one is running in this process already (or
    RAY_ADDRESS is set); "auto" joins the cluster started on this machine with
    ``ray start``; ``ray://host:10001`` connects through the Ray client.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = engine.address or None
    env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}}
    try:
        if address is None:
            ray.init(runtime_env=env, include_dashboard=False, ignore_reinit_error=True)
        else:
            ray.init(address=address, runtime_env=env, ignore_reinit_error=True)
    except (ConnectionError, TimeoutError, ValueError) as exc:
        raise TlAppError(
            f"Could not connect to the Ray cluster at {engine.address!r}: {str(exc).rstrip('.')}. Start one with "
            f"'ray start --head' and pass --address auto (same machine) or --address ray://HEAD:10001, "
            f"or leave --address empty to start a local instance."
        ) from None
    quiet_ray_data()
    return ray


def check_resources(ray, engine) -> None:
    """Fail now, not hang: one worker's CPUs/GPUs must exist in the cluster as it is."""
    total = ray.cluster_resources()
    for name, per_worker in (("CPU", engine.cpus_per_worker), ("GPU", engine.gpus_per_worker)):
        have = float(total.get(name, 0.0))
        if per_worker and per_worker > have:
            flag = f"--{name.lower()}s-per-worker"
            raise TlAppError(
                f"{flag} {per_worker:g}: the Ray cluster has {have:g} {name}(s) in all, so no worker could start. "
                f"Lower {flag} (0 for none), or add nodes with {name}s (an autoscaling cluster: start one first)."
            )


def quiet_ray_data() -> None:
    """tl-app prints its own progress; Ray Data's bars and INFO lines would interleave with it."""
    import logging

    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        if hasattr(context, "enable_operator_progress_bars"):
            context.enable_operator_progress_bars = False
    except Exception:  # an older or newer Ray without these knobs only prints more
        pass
    logging.getLogger("ray.data").setLevel(logging.WARNING)
