"""What every UltraRes node shares: the menu category, the one way bad input is reported, and the
native (training) size of a model family."""

PACK = "UltraRes"


def category(sub: str = "") -> str:
    """Node-menu category: everything sits under the one pack category."""
    return f"{PACK}/{sub}" if sub else PACK


class UltraResInputError(ValueError):
    """Bad input to a node: the message names the node, the input and the fix."""


def input_error(node: str, input_name: str, problem: str, fix: str) -> UltraResInputError:
    return UltraResInputError(f"{node}: input '{input_name}': {problem}. Fix: {fix}")


def percent_inputs(io, start: float, end: float, what: str) -> list:
    """The start/end percent pair every time-gated node uses (ComfyUI's convention: 0 = first step)."""
    return [
        io.Float.Input("start_percent", default=start, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Where in the schedule {what} starts (0 = first step, 1 = end)."),
        io.Float.Input("end_percent", default=end, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Where in the schedule {what} stops (0 = first step, 1 = end)."),
    ]


def sigma_of(transformer_options: dict, timestep) -> float:
    """The current sigma of a model call (ComfyUI passes sigma as the `t` of apply_model)."""
    sigmas = transformer_options.get("sigmas")
    return float((sigmas if sigmas is not None else timestep).reshape(-1)[0])


# Native size in latent px per model family (first match along the config's class hierarchy).
NATIVE_LATENT_SIZE = {
    "ChromaRadiance": 1024,  # pixel space
    "SD15": 64, "SDXL": 128, "SDXLRefiner": 128, "SD3": 128, "Flux": 128, "AuraFlow": 128,
    "Chroma": 128, "HiDream": 128, "Lumina2": 128,
}


def native_latent_size(model) -> int | None:
    """The side, in latent pixels, the model was trained at; None if unknown. A model config may
    declare it (`native_latent_size`, as the toy world does); else it follows from the family."""
    config = model.model.model_config
    declared = getattr(config, "native_latent_size", None)
    if declared:
        return declared
    for cls in type(config).__mro__:
        if cls.__name__ == "SD20":  # SD2.x 768-v and 512-base share one config class
            return 96 if model.model.model_type.name == "V_PREDICTION" else 64
        if cls.__name__ in NATIVE_LATENT_SIZE:
            return NATIVE_LATENT_SIZE[cls.__name__]
    return None


# Model family per config class (first match along the class hierarchy): the families whose
# reference settings the pack ships (ScaleCrafter's presets are written per family).
FAMILIES = {"SD15": "SD1.x", "SD20": "SD2.x", "SDXL": "SDXL"}


def model_family(model) -> str:
    """'SD1.x', 'SD2.x' or 'SDXL' from the model config's class (SSD-1B, Vega and the other SDXL
    derivatives subclass SDXL; SD2.x unCLIP subclasses SD20); else the config's class name."""
    config = model.model.model_config
    for cls in type(config).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return type(config).__name__
