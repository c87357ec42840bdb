"""Why a target's view of an instance could not be made."""


class ShapingFailed(Exception):
    """This instance cannot be given this target's header (a value too long, say).
    Never sent or stored as received instead: the reason is kept with the job."""


class ShapingRefused(ShapingFailed):
    """Refused on purpose, e.g. burned-in annotation for a de-identifying target."""
