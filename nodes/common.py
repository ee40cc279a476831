"""What every UltraRes node shares: the menu category and the one way bad input is reported."""

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
