"""The training schedule and target: zero-terminal-SNR rescaled betas and v-prediction (Lin et al. 2024,
"Common Diffusion Noise Schedules and Sample Steps are Flawed"), for training and for the saved pipeline.

diffusers implements the rescaling (`rescale_betas_zero_snr` of its schedulers) and the v target
(`DDPMScheduler.get_velocity`); this module only decides the config: the training scheduler gets the rescaled
betas and the prediction type, and a saved or sampling pipeline's scheduler gets the same plus trailing
timestep spacing (the paper's §3.3: sampling must start from the last timestep), with rescaled classifier-free
guidance (§3.4) at sampling time.
"""

from __future__ import annotations

PREDICTION_TYPES = ("epsilon", "v_prediction")
DEFAULT_GUIDANCE_RESCALE = 0.7  # the paper's phi


def training_overrides(args) -> dict:
    """Scheduler config entries the flags change (empty: the model's own schedule and target)."""
    overrides: dict = {}
    if getattr(args, "prediction_type", None):
        overrides["prediction_type"] = args.prediction_type
    if getattr(args, "zero_terminal_snr", False):
        overrides["rescale_betas_zero_snr"] = True
    return overrides


def training_scheduler(scheduler, args):
    """The DDPM scheduler the trainer noises with, rebuilt from its config with the flags' overrides. Refuses an
    epsilon target with a zero terminal SNR: at SNR 0 the input holds no signal and epsilon is the input itself,
    so the model learns nothing at the last timestep and samples cannot start from pure noise (the paper's §3.2)."""
    overrides = training_overrides(args)
    if not overrides:
        return scheduler
    rebuilt = type(scheduler).from_config(scheduler.config, **overrides)
    if rebuilt.config.get("rescale_betas_zero_snr") and rebuilt.config.prediction_type != "v_prediction":
        raise ValueError(
            "--zero_terminal_snr needs a v-prediction target: add --prediction_type v_prediction (the model's "
            f"scheduler says {rebuilt.config.prediction_type})"
        )
    return rebuilt


def inference_scheduler(scheduler, prediction_type: str | None, zero_terminal_snr: bool) -> object:
    """A pipeline's scheduler made to match what was trained (`--prediction_type`, `--zero_terminal_snr`): the
    prediction type; with zero terminal SNR also the rescaled betas and trailing spacing. Unchanged when neither
    flag was given (the model's schedule was trained as is)."""
    updates: dict = {}
    if prediction_type and scheduler.config.get("prediction_type") != prediction_type:
        updates["prediction_type"] = prediction_type
    if zero_terminal_snr:
        updates.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if not updates:
        return scheduler
    return type(scheduler).from_config(scheduler.config, **updates)


def guidance_rescale(zero_terminal_snr: bool, requested: float | None) -> float:
    """Rescaled classifier-free guidance for sampling: the flag's value, else the paper's 0.7 with zero terminal
    SNR (guidance overexposes otherwise), else 0 (plain guidance)."""
    if requested is not None:
        return requested
    return DEFAULT_GUIDANCE_RESCALE if zero_terminal_snr else 0.0
