"""One closed set of dead-letter reasons (``shared.schemas.reasons.Reason``): every reason the
code can raise is a member, metrics label by it, and the README, the dashboards and the alert
rules name members only."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from shared.metrics import StageMetrics
from shared.runtime.errors import PoisonError
from shared.schemas import Reason
from shared.schemas.reasons import DESCRIPTIONS

ROOT = Path(__file__).resolve().parents[2]
# error types whose first argument (or ``reason=``) is a dead-letter reason; their subclasses
# and any class whose __init__ takes ``reason`` first are found in the source
ERROR_TYPES = {"PoisonError", "InvalidInstance", "BlobError"}
CODES = {r.value for r in Reason}


def reason_carrying_types(trees: list[ast.Module]) -> set[str]:
    """ERROR_TYPES, their subclasses, and classes whose ``__init__`` takes ``reason`` first."""
    types = set(ERROR_TYPES)
    classes = [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while True:
        found = set(types)
        for cls in classes:
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in cls.bases}
            init = next(
                (f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"),
                None,
            )
            takes_reason = init is not None and [a.arg for a in init.args.args[1:2]] == ["reason"]
            if bases & types or takes_reason:
                found.add(cls.name)
        if found == types:
            return types
        types = found


class ReasonSites(ast.NodeVisitor):
    """Every place in a module that names a reason: calls of the error types, ``reason=``
    keywords, class-level ``reason = ...``. Collects the codes and what it could not accept."""

    def __init__(self, where: str, error_types: set[str] = ERROR_TYPES) -> None:
        self.where = where
        self.error_types = error_types
        self.codes: list[str] = []
        self.bad: list[str] = []
        self._reason_params: list[set[str]] = [set()]  # params annotated as Reason, per function

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        typed = {
            a.arg
            for a in args
            if a.annotation is not None and "Reason" in ast.unparse(a.annotation)
        }
        self._reason_params.append(typed)
        self.generic_visit(node)
        self._reason_params.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name in self.error_types and node.args:
            self._check(node.args[0])
        for kw in node.keywords:
            if kw.arg == "reason":
                self._check(kw.value)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id == "Reason":
            if node.attr in Reason.__members__:
                self.codes.append(Reason[node.attr].value)
            else:
                self.bad.append(f"{self.where}:{node.lineno}: Reason.{node.attr} does not exist")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        # a hand-kept set of reason codes (``REASONS = frozenset({...})``): members only
        names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        value = node.value
        if isinstance(value, ast.Call) and ast.unparse(value.func) in ("set", "frozenset"):
            value = value.args[0] if value.args else value
        if any("REASON" in n.upper() for n in names) and isinstance(value, ast.Set | ast.List):
            for const in ast.walk(value):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    self._check(const)
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for stmt in node.body:
            target, value = None, None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
            elif isinstance(stmt, ast.AnnAssign):
                target, value = stmt.target, stmt.value
            if (
                isinstance(target, ast.Name)
                and target.id == "reason"
                and value is not None
                and not isinstance(value, ast.Call)  # a model field's declaration
            ):
                self._check(value)
        self.generic_visit(node)

    def _check(self, node: ast.expr) -> None:
        at = f"{self.where}:{node.lineno}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            self.codes.append(node.value)
            if node.value not in CODES:
                self.bad.append(f"{at}: {node.value!r} is not a Reason")
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) == "Reason":
            pass  # a member (visit_Attribute checks that it exists)
        elif isinstance(node, ast.Attribute) and node.attr == "reason":
            pass  # passes on a typed error's reason (checked where that error is raised)
        elif isinstance(node, ast.Name) and node.id in self._reason_params[-1]:
            pass  # a parameter annotated as Reason
        else:
            self.bad.append(f"{at}: reason is {ast.unparse(node)!r}, not a Reason member")


def scan(source: str, where: str, error_types: set[str] | None = None) -> ReasonSites:
    tree = ast.parse(source)
    sites = ReasonSites(where, error_types or reason_carrying_types([tree]))
    sites.visit(tree)
    return sites


def test_every_reason_the_code_raises_is_a_member_and_every_member_is_raised() -> None:
    codes: set[str] = set()
    bad: list[str] = []
    files = sorted((ROOT / "shared").rglob("*.py")) + sorted((ROOT / "services").rglob("*.py"))
    files = [f for f in files if f != ROOT / "shared" / "schemas" / "reasons.py"]  # the enum
    sources = {f: f.read_text() for f in files}
    error_types = reason_carrying_types([ast.parse(text) for text in sources.values()])
    assert {"PoisonError", "InvalidInstance", "BlobError"} < error_types  # subclasses found too
    for path, text in sources.items():
        sites = scan(text, str(path.relative_to(ROOT)), error_types)
        codes.update(sites.codes)
        bad += sites.bad
    assert bad == []
    # no stale members either: each one is raised somewhere
    assert codes == CODES, f"members never raised: {sorted(CODES - codes)}"


def test_the_scan_catches_free_text_reasons() -> None:
    source = """
def f(exc, reason: Reason, other: str):
    raise PoisonError("made_up", "m")
    raise InvalidInstance(f"bad_{other}", "m")
    raise BlobError(Reason.NO_SUCH_MEMBER, "m")
    DeadLetter(reason=other)
    PoisonError(exc.reason, "ok")
    PoisonError(reason, "ok")
    PoisonError(Reason.SCHEMA, "ok")
class E(Exception):
    reason = "invented"
class Sub(PoisonError):
    pass
class Own(Exception):
    def __init__(self, reason, message): ...
Sub("sub_made_up", "m")
Own("own_made_up", "m")
REASONS = frozenset({"schema", "set_made_up"})
"""
    sites = scan(source, "x.py")
    assert [int(b.split(":")[1]) for b in sites.bad] == [3, 4, 5, 6, 11, 16, 17, 18]
    assert sites.codes == [
        "made_up",
        "schema",
        "invented",
        "sub_made_up",
        "own_made_up",
        "schema",
        "set_made_up",
    ]


def test_poison_error_refuses_a_code_that_is_not_a_member() -> None:
    assert PoisonError("schema", "m").reason is Reason.SCHEMA
    with pytest.raises(ValueError):
        PoisonError("free text", "m")


def test_metrics_label_every_member_as_itself() -> None:
    registry = CollectorRegistry()
    metrics = StageMetrics(registry, "ingest")
    for reason in Reason:
        metrics.dead_letter(reason)
    for reason in Reason:
        assert (
            registry.get_sample_value(
                "radstream_deadletters_total", {"stage": "ingest", "reason": reason.value}
            )
            == 1
        )
    assert (
        registry.get_sample_value(
            "radstream_deadletters_total", {"stage": "ingest", "reason": "other"}
        )
        is None
    )
    assert set(DESCRIPTIONS) == set(Reason)


def test_readme_lists_exactly_the_members() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Dead-letter reasons", 1)[1].split("\n#", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert listed == [r.value for r in Reason]
    # codes quoted elsewhere next to "reason" are members too
    for line in text.splitlines():
        if "reason" in line.lower() and "|" not in line:
            for code in re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+|[a-z]+)`", line):
                if code not in {"reason", "deadletter"}:
                    assert code in CODES, f"README names {code!r} as a reason"


MATCHER = re.compile(r'reason\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _matcher_codes(expr: str) -> list[str]:
    codes = []
    for _, value in MATCHER.findall(expr):
        codes += [v for v in value.split("|") if v]
    return codes


def _label_codes(node: object) -> list[str]:
    """``reason`` values of label sets (``labels:``, ``exp_labels:``) anywhere in a YAML tree."""
    if isinstance(node, list):
        return [c for item in node for c in _label_codes(item)]
    if not isinstance(node, dict):
        return []
    codes = []
    for key, value in node.items():
        if key in ("exp_labels", "labels") and isinstance(value, dict) and "reason" in value:
            codes.append(str(value["reason"]))
        codes += _label_codes(value)
    return codes


def test_dashboards_and_rules_name_members_only() -> None:
    named: list[tuple[str, str]] = []
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        named += [(path.name, c) for c in _matcher_codes(json.dumps(json.loads(path.read_text())))]
    for path in sorted((ROOT / "deploy" / "prometheus").glob("*.yml")):
        text = path.read_text()
        named += [(path.name, c) for c in _matcher_codes(text.replace('\\"', '"'))]

        named += [(path.name, c) for c in _label_codes(yaml.safe_load(text))]
    assert named, "no reason matcher found: the scan is not reading the files"
    assert [(f, c) for f, c in named if c not in CODES] == []
    assert _matcher_codes('x{reason=~"schema|made_up",reason!="integrity"}') == [
        "schema",
        "made_up",
        "integrity",
    ]
