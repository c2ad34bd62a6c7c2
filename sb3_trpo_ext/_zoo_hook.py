"""
Start-up hook that makes RL Zoo (``rl_zoo3``) know about this package, with no step on the user's side.

RL Zoo has no plugin mechanism: the ``--algo`` choices come from ``rl_zoo3.utils.ALGOS`` when its scripts parse
their arguments, the hyperparameter file is looked up next to the zoo's own package, and Optuna tuning uses the
dictionaries of ``rl_zoo3.hyperparams_opt``. So the registration must be in place before any zoo script runs.

Wheel and editable installs put this file at the root of site-packages as the top-level module
``_sb3_trpo_ext_zoo_hook`` (see ``[tool.hatch.build.targets.wheel.force-include]`` in ``pyproject.toml``), next to
``sb3_trpo_ext_zoo.pth`` (from ``_zoo_hook.pth`` beside this file), which imports it when the interpreter starts:
importing it as ``sb3_trpo_ext._zoo_hook`` would import the package, and torch with it. At start-up
:func:`install` only puts a finder in :data:`sys.meta_path`: no other import happens (not even :mod:`typing`), so
programs that never import rl_zoo3 pay a few microseconds.

When one of :data:`TARGET_MODULES` gets imported, the finder lets the normal machinery find it, wraps its loader,
and once the module has executed hands it to :func:`sb3_trpo_ext.zoo.on_zoo_import`, which does the actual
registration (and is the only place that imports torch, stable-baselines3 and this package's algorithms).
A failure there is turned into a :class:`RuntimeWarning`: rl_zoo3 must keep working for its own algorithms even
when this package is broken or half uninstalled.
"""

from __future__ import annotations

import sys

# Not ``from typing import TYPE_CHECKING``: this module runs at every interpreter start-up and must import nothing.
# mypy treats a module constant named TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

#: rl_zoo3 modules whose import triggers :func:`sb3_trpo_ext.zoo.on_zoo_import`.
TARGET_MODULES = frozenset({"rl_zoo3.utils", "rl_zoo3.hyperparams_opt", "rl_zoo3.exp_manager"})
#: module that performs the registration, imported only once a target module has executed.
REGISTRAR = "sb3_trpo_ext.zoo"
#: attribute set on the installed finder, so that :func:`install` stays idempotent even if this file is loaded
#: under two names (``_sb3_trpo_ext_zoo_hook`` and, from a source checkout, ``sb3_trpo_ext._zoo_hook``).
_MARKER = "_sb3_trpo_ext_zoo_hook"


#: the failures already reported: each of the :data:`TARGET_MODULES` an rl_zoo3 script imports would report the same
#: failure again (a different one is still reported).
_reported: set[str] = set()


def _register(module: ModuleType) -> None:
    """
    Hand a freshly executed rl_zoo3 module to the registrar; never raise, and report each failure once.

    :param module: the rl_zoo3 module that has just been executed.
    """
    try:
        __import__(REGISTRAR)
        sys.modules[REGISTRAR].on_zoo_import(module)
    except Exception as error:
        failure = f"{type(error).__name__}: {error}"
        if failure in _reported:
            return
        _reported.add(failure)
        import warnings

        warnings.warn(
            f"sb3_trpo_ext could not register its algorithms with RL Zoo ({type(error).__name__}: {error}); "
            "rl_zoo3 still works for its own algorithms.",
            RuntimeWarning,
            stacklevel=2,
        )


class RegisteringLoader:
    """
    Loader wrapper: run the real loader, then call :func:`_register` on the executed module.

    :param loader: the loader that the import machinery found for the module.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        """
        Delegate module creation to the real loader.

        :param spec: the module's spec.
        :return: the module, or None for the default module creation.
        """
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        """
        Execute the module with the real loader, then register.

        :param module: the module to execute.
        """
        # Put the real loader back first, so that the module looks untouched (tracebacks, inspect, reload).
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register(module)

    def __getattr__(self, name: str) -> Any:
        # Anything else (get_source, get_resource_reader, ...) is the real loader's.
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class ZooImportHook:
    """:data:`sys.meta_path` finder that wraps the loader of :data:`TARGET_MODULES` and finds nothing itself."""

    _sb3_trpo_ext_zoo_hook = True

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> ModuleSpec | None:
        """
        Find ``fullname`` with the other finders; wrap its loader when it is a target module.

        :param fullname: the module being imported.
        :param path: the parent package's ``__path__`` (None for a top-level module).
        :param target: the module being reloaded, if any.
        :return: the wrapped spec for a target module, None otherwise (the next finders are then asked as usual).
        """
        if fullname not in TARGET_MODULES:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or getattr(finder, _MARKER, False) or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return None
            spec.loader = RegisteringLoader(spec.loader)
            return spec
        return None


def install() -> None:
    """Put a :class:`ZooImportHook` at the front of :data:`sys.meta_path`, unless one is there already."""
    if not any(getattr(finder, _MARKER, False) for finder in sys.meta_path):
        sys.meta_path.insert(0, ZooImportHook())


def uninstall() -> None:
    """Remove every :class:`ZooImportHook` (of either copy of this module) from :data:`sys.meta_path`."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not getattr(finder, _MARKER, False)]
