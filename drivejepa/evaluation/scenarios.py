"""Named scenarios of a suite file: which scenes of the evaluated split each metric is broken down over.

A scenario is a filter over scenes. Phrases match whole words of the lower-cased scene description (so ``night``
matches ``"Night, rain, turn left"`` and the synthetic world's comma-separated tags alike, but ``ped`` does not match
``"pedestrians"``), which lets one suite file serve the synthetic world and real nuScenes descriptions::

    scenarios:
      all: {}                                   # every scene
      night: {any: [night]}
      pedestrians: {any: [pedestrians, pedestrian, peds]}
      day dry: {none: [night, rain]}
      left turn at intersection: {all: [intersection], any: [turn left, left turn]}
      hand picked: {scenes: [scene-0003, scene-0008]}
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from drivejepa.config import ConfigError

_KEYS = ("any", "all", "none", "scenes")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    any: tuple[str, ...] = ()
    all: tuple[str, ...] = ()
    none: tuple[str, ...] = ()
    scenes: tuple[str, ...] = ()

    def matches(self, scene: str, description: str) -> bool:
        if self.scenes and scene not in self.scenes:
            return False
        text = description.lower()
        if self.any and not any(_has_phrase(text, p) for p in self.any):
            return False
        if not all(_has_phrase(text, p) for p in self.all):
            return False
        return not any(_has_phrase(text, p) for p in self.none)


def _has_phrase(text: str, phrase: str) -> bool:
    words = phrase.lower().split()
    pattern = r"\b" + r"\s+".join(re.escape(w) for w in words) + r"\b"
    return re.search(pattern, text) is not None


def parse_scenarios(spec: Mapping, source: str = "suite") -> list[Scenario]:
    """Check a ``scenarios`` mapping from a suite file and return the scenarios in file order."""
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(f"{source}: 'scenarios' must be a non-empty mapping of name -> filter")
    out = []
    for name, rule in spec.items():
        rule = {} if rule is None else rule
        if not isinstance(rule, Mapping):
            raise ConfigError(f"{source}: scenario '{name}' must be a mapping with keys among {list(_KEYS)}")
        unknown = sorted(set(rule) - set(_KEYS))
        if unknown:
            raise ConfigError(f"{source}: scenario '{name}' has unknown key(s) {unknown} (valid: {list(_KEYS)})")
        values = {}
        for key in _KEYS:
            value = rule.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise ConfigError(f"{source}: scenario '{name}': '{key}' must be a list of non-empty strings")
            values[key] = tuple(v.strip() for v in value)
        out.append(Scenario(name=str(name), **values))
    return out


def assign_scenes(scenarios: list[Scenario], descriptions: Mapping[str, str]) -> dict[str, list[str]]:
    """Scenario name -> the scenes (in ``descriptions`` order) it selects. Unknown explicit scenes are an error."""
    known = set(descriptions)
    result = {}
    for sc in scenarios:
        missing = [s for s in sc.scenes if s not in known]
        if missing:
            raise ConfigError(f"scenario '{sc.name}' lists scenes not in the evaluated split: {missing}")
        result[sc.name] = [s for s, d in descriptions.items() if sc.matches(s, d)]
    return result
