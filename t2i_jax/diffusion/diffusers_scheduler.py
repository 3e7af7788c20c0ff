"""A diffusers `scheduler_config.json` read as this project's chain: the betas and the prediction,
and for each sampler the steps (t, s), the final abar and the x_T scale that diffusers' scheduler
class of that sampler visits, so that a pipeline folder samples here as it does in diffusers.

    sched = DiffusersScheduler.from_config(json.load(open("scheduler/scheduler_config.json")))
    schedule = sched.schedule()                          # diffusion/schedules.Schedule
    steps = sched.steps("ddim", 50)                      # samplers.Steps for samplers.chain

The folder's `_class_name` names its sampler (`default_sampler`); another sampler reads the same
config as diffusers' `OtherScheduler.from_config(config)` does: the fields that class reads, with
that class's defaults for the fields the file lacks (DPM-Solver and Euler default to "linspace"
spacing, DDIM, DDPM and PNDM to "leading"). What each class visits (diffusers 0.3x):
  ddim      t = the spacing's timesteps (+ steps_offset on "leading"); each step goes to
            s = t - T // S (not always the next visited t: "trailing" and "linspace" differ), the
            last below 0 to `final_alpha_cumprod`: 1 with set_alpha_to_one, else alphas_cumprod[0]
            (the chain then ends on x at t = 0, not on x0_hat)
  ddpm      the same t; each step to the next visited t, the last to the data
  dpmpp_2m  linspace(0, T - 1, S + 1) rounded, reversed, the last dropped ("leading":
            arange(S + 1) * (T // (S + 1)), reversed, the last dropped, + steps_offset); each step
            to the next, the last to sigma 0 (final_sigmas_type "zero", first order there)
  euler(_a) "leading" as DDIM; "trailing" round(arange(T, 0, -T / S)) - 1; "linspace"
            linspace(0, T - 1, S), fractional unless (T - 1) / (S - 1) is whole: the model is
            then called at t = 799.2 and abar read between timesteps (Schedule.at, as diffusers
            interpolates its sigmas); each step to the next, the last to sigma 0. The chain starts at
            init_noise_sigma: sqrt(1 + sigma_max^2) in the sigma form on "leading" (x_T = the unit
            noise here), sigma_max on the others (x_T = sqrt(1 - abar_t0) times it)
  pndm      PLMS: t as DDIM's (+ steps_offset on "leading"; "trailing" and "linspace" as
            PNDMScheduler makes them), each step t -> t - T // S, the first done twice (the
            second model call at the next visited t1, its step from the first call's x as if
            from t1 + T // S to t1), the last to final_alpha_cumprod
A field or value the chain cannot follow is refused, naming it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from t2i_jax.diffusion import samplers, schedules

# diffusers class -> the project's sampler (PNDMScheduler: PLMS with skip_prk_steps, the
# default of SD 1.x folders; its Runge-Kutta warm-up, skip_prk_steps false, is refused).
SAMPLER_OF_CLASS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "PNDMScheduler": "pndm",
}
CLASS_OF_SAMPLER = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
                    "dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
                    "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DEFAULT_SPACING = {"DDIMScheduler": "leading", "DDPMScheduler": "leading",
                   "PNDMScheduler": "leading", "DPMSolverMultistepScheduler": "linspace",
                   "EulerDiscreteScheduler": "linspace",
                   "EulerAncestralDiscreteScheduler": "linspace"}

_ANY = object()
_ALL = tuple(CLASS_OF_SAMPLER.values())
_DPM = ("DPMSolverMultistepScheduler",)
_EULER = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
_SIGMAS = _DPM + _EULER
# field -> (the classes that read it, the values the chain follows (_ANY: every value))
FIELDS = {
    "num_train_timesteps": (_ALL, _ANY), "beta_start": (_ALL, _ANY), "beta_end": (_ALL, _ANY),
    "beta_schedule": (_ALL, _ANY), "trained_betas": (_ALL, _ANY),
    "prediction_type": (_ALL, _ANY), "timestep_spacing": (_ALL, _ANY),
    "steps_offset": (_ALL, _ANY), "rescale_betas_zero_snr": (_ALL, _ANY),
    "set_alpha_to_one": (("DDIMScheduler", "PNDMScheduler"), _ANY),
    "clip_sample": (("DDIMScheduler", "DDPMScheduler"), (False,)),
    "thresholding": (("DDIMScheduler", "DDPMScheduler") + _DPM, (False,)),
    "clip_sample_range": ((), _ANY), "sample_max_value": ((), _ANY),
    "dynamic_thresholding_ratio": ((), _ANY), "skip_prk_steps": (("PNDMScheduler",), (True,)),
    # fixed_small is the posterior variance the ddpm sampler draws (fixed_large, beta, is not
    # what a folder's stage options ask for: refused rather than silently not followed)
    "variance_type": (("DDPMScheduler",) + _DPM, (None, "fixed_small")),
    "solver_order": (_DPM, (2,)), "algorithm_type": (_DPM, ("dpmsolver++",)),
    "solver_type": (_DPM, ("midpoint",)), "lower_order_final": (_DPM, _ANY),
    "euler_at_final": (_DPM, (False,)), "final_sigmas_type": (_SIGMAS, ("zero",)),
    "lambda_min_clipped": (_DPM, (-math.inf, float("-inf"))),
    "use_karras_sigmas": (_SIGMAS, (False, None)), "use_exponential_sigmas": (_SIGMAS, (False, None)),
    "use_beta_sigmas": (_SIGMAS, (False, None)), "use_lu_lambdas": (_DPM, (False, None)),
    "use_flow_sigmas": (_SIGMAS, (False, None)), "flow_shift": ((), _ANY),
    "interpolation_type": (_EULER[:1], ("linear",)), "timestep_type": (_EULER[:1], ("discrete",)),
    "sigma_min": (_EULER[:1], (None,)), "sigma_max": (_EULER[:1], (None,)),
}


def _refuse(field: str, value, why: str) -> ValueError:
    return ValueError(f"scheduler_config.json: {field}={value!r} {why}")


@dataclasses.dataclass(frozen=True)
class DiffusersScheduler:
    """A scheduler_config.json (its `_class_name` and fields)."""
    class_name: str
    config: dict

    @classmethod
    def from_config(cls, config: dict) -> "DiffusersScheduler":
        """Checks the class and every field the project cannot follow (ValueError naming it)."""
        class_name = config.get("_class_name")
        if class_name not in SAMPLER_OF_CLASS:
            raise _refuse("_class_name", class_name,
                          f"is a scheduler this project cannot follow; it reads "
                          f"{sorted(SAMPLER_OF_CLASS)} (choose one of its samplers with --sampler: "
                          f"{sorted(CLASS_OF_SAMPLER)}).")
        sched = cls(class_name, dict(config))
        for field, value in config.items():
            if field.startswith("_") or field in FIELDS:
                continue
            if value not in (None, False):  # an unknown switch that is off changes nothing
                raise _refuse(field, value, "is a field this project does not know how to follow; "
                              "remove it from the file if it has no effect on the chain.")
        if sched.get("beta_schedule", "linear") not in BETA_SCHEDULES and \
                sched.get("trained_betas", None) is None:
            raise _refuse("beta_schedule", sched.get("beta_schedule"),
                          f"is not one of {BETA_SCHEDULES}.")
        if sched.get("prediction_type", "epsilon") not in PREDICTIONS:
            raise _refuse("prediction_type", sched.get("prediction_type"),
                          f"is not one of {sorted(PREDICTIONS)}.")
        sched.check(sched.default_sampler)
        return sched

    def get(self, field: str, default=None):
        value = self.config.get(field, default)
        return default if value is None and default is not None else value

    @property
    def default_sampler(self) -> str:
        return SAMPLER_OF_CLASS[self.class_name]

    @property
    def prediction(self) -> str:
        """"eps", "v" or "x0" (prediction_type epsilon, v_prediction, sample)."""
        return PREDICTIONS[self.get("prediction_type", "epsilon")]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.get("num_train_timesteps", 1000))

    def check(self, sampler: str) -> None:
        """Refuses a field whose value the class of `sampler` reads and the chain cannot follow."""
        target = CLASS_OF_SAMPLER[sampler]
        for field, value in self.config.items():
            readers, allowed = FIELDS.get(field, ((), _ANY))
            if target in readers and allowed is not _ANY and value not in allowed:
                raise _refuse(field, value, f"is not followed by this project's {sampler} sampler "
                              f"(diffusers' {target}); it follows {list(allowed)}.")
        if target == "PNDMScheduler" and self.prediction != "eps":
            raise _refuse("prediction_type", self.get("prediction_type"),
                          "is not followed by pndm: diffusers' PNDMScheduler combines a "
                          "v-model's raw outputs across steps before converting them to eps, "
                          "which this project's PLMS (on eps) does not; use --sampler ddim, "
                          "dpmpp_2m or euler.")

    def betas(self) -> np.ndarray:
        """beta_t [T] as diffusers makes them (float64 here: the Schedule derives in float64)."""
        T = self.num_train_timesteps
        trained = self.get("trained_betas", None)
        if trained is not None:
            betas = np.asarray(trained, np.float64)
            if betas.shape != (T,):
                raise _refuse("trained_betas", f"<{betas.size} values>",
                              f"must hold num_train_timesteps={T} values.")
        else:
            kind = self.get("beta_schedule", "linear")
            b0, b1 = float(self.get("beta_start", 0.0001)), float(self.get("beta_end", 0.02))
            if kind == "linear":
                betas = np.linspace(b0, b1, T, dtype=np.float64)
            elif kind == "scaled_linear":  # linear in sqrt(beta) (LDM's schedule)
                betas = np.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=np.float64) ** 2
            else:  # squaredcos_cap_v2: IDDPM's cosine, betas capped at 0.999
                betas = schedules.betas_for_alpha_bar(
                    T, lambda s: np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
        if self.get("rescale_betas_zero_snr", False):
            betas = schedules.rescale_zero_terminal_snr(betas)
        return betas

    def schedule(self) -> schedules.Schedule:
        return schedules.schedule_from_betas(self.betas())

    def spacing(self, sampler: str) -> str:
        target = CLASS_OF_SAMPLER[sampler]
        spacing = self.get("timestep_spacing", DEFAULT_SPACING[target])
        if spacing not in samplers.SPACINGS:
            raise _refuse("timestep_spacing", spacing, f"is not one of {samplers.SPACINGS}.")
        return spacing

    def steps(self, sampler: str, num_steps: int, schedule: Optional[schedules.Schedule] = None
              ) -> samplers.Steps:
        """The samplers.Steps that diffusers' scheduler class of `sampler` visits in num_steps."""
        self.check(sampler)
        T, S = self.num_train_timesteps, int(num_steps)
        if not 1 <= S <= T:
            raise ValueError(f"the number of steps must be in 1..{T}, got {S}.")
        spacing, offset = self.spacing(sampler), int(self.get("steps_offset", 0) or 0)
        target = CLASS_OF_SAMPLER[sampler]
        if target == "DPMSolverMultistepScheduler":
            if spacing == "linspace":
                t = np.linspace(0, T - 1, S + 1).round()[::-1][:-1]
            elif spacing == "leading":
                t = (np.arange(S + 1) * (T // (S + 1))).round()[::-1][:-1] + offset
            else:
                t = np.arange(T, 0, -T / S).round() - 1
        elif target == "PNDMScheduler" and spacing == "trailing":
            t = np.round(np.arange(T, 0, -T / S)) - 1
        elif target == "PNDMScheduler" and spacing == "linspace":
            t = np.linspace(0, T - 1, S).round()[::-1]
        elif spacing == "leading":
            t = (np.arange(S) * (T // S)).round()[::-1] + offset
        elif spacing == "trailing":
            t = np.round(np.arange(T, 0, -T / S)) - 1
        else:
            t = np.linspace(0, T - 1, S)[::-1]
            if target in ("DDIMScheduler", "DDPMScheduler"):
                t = t.round()
        whole = np.all(t == np.round(t))  # Euler on "linspace": fractional t, read between
        t = t.astype(np.int64) if whole else t.astype(np.float32)
        if np.any(t > T - 1) or np.any(t < 0):
            raise ValueError(f"{S} steps with timestep_spacing {spacing!r} and steps_offset "
                             f"{offset} visit timesteps outside 0..{T - 1} ({t.max()}): use "
                             "fewer steps.")
        if np.any(np.diff(t) >= 0):
            raise ValueError(f"{S} steps with timestep_spacing {spacing!r} visit a timestep twice "
                             f"({t.tolist()}): use fewer steps.")
        final, scale = 1.0, 1.0
        if target in ("DDIMScheduler", "PNDMScheduler"):
            s = t - T // S
            if not self.get("set_alpha_to_one", True):
                schedule = schedule or self.schedule()
                final = float(np.asarray(schedule.alphas_cumprod)[0])
        else:
            s = np.append(t[1:], -1)
        s = np.where(s < 0, -1, s)
        if target == "PNDMScheduler":  # the redone first step: t[1] + T // S -> t[1]
            second = (t[1] + T // S, t[1]) if len(t) > 1 else None
            return samplers.plms_steps(t, s, final, second)
        if target in _EULER and spacing != "leading":  # init_noise_sigma = sigma_max
            schedule = schedule or self.schedule()
            scale = float(np.sqrt(1.0 - np.asarray(schedule.alphas_cumprod, np.float64)[
                int(round(float(t[0])))]))
        dtype = np.int32 if whole else np.float32
        return samplers.Steps(t.astype(dtype), s.astype(dtype), final, scale)
