"""
Errors for spaces an algorithm cannot handle: a ``ValueError`` naming the space, which is also the exception SB3 and
sb3-contrib raise for it, so that code written for them (``except AssertionError``, ``pytest.raises``) still catches
it.
"""


class UnsupportedActionSpaceError(ValueError, AssertionError):
    """An action space the algorithm does not support (SB3's own check raises ``AssertionError``)."""


class UnsupportedObservationSpaceError(ValueError, NotImplementedError):
    """An observation space the algorithm does not support (SB3's preprocessing raises ``NotImplementedError``)."""
