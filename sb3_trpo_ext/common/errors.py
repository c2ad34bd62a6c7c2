"""
Errors for spaces an algorithm cannot handle: a ``ValueError`` naming the space, which is also the exception SB3's own
space checks raise (``AssertionError`` for actions, ``NotImplementedError`` for observations), so that code written
for them (``except AssertionError``, ``pytest.raises``) still catches it. Spaces that SB3 accepts and then fails on
later, with another error (an ``IndexError`` or a ``TypeError`` from inside a rollout), get the same classes.
"""


class UnsupportedActionSpaceError(ValueError, AssertionError):
    """An action space the algorithm does not support (SB3's own check raises ``AssertionError``)."""


class UnsupportedObservationSpaceError(ValueError, NotImplementedError):
    """An observation space the algorithm does not support (SB3's preprocessing raises ``NotImplementedError``)."""
