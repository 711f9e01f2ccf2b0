"""The model registry's aliases: who is ``champion``, who was (``previous``), and the audit
log of every move. One module for the ``promote`` stage and the ``llmops promote``,
``llmops rollback`` and ``llmops models list`` commands, so both move aliases the same way.

Aliases: ``challenger`` is the newest registered version (set by ``register``);
``champion`` is the version to serve; ``previous`` the champion before it, the target of
a rollback; ``rolled_back`` the champion a rollback demoted; ``deployed-<target>`` the version
live on a deploy target (``deployed-local``: the endpoint of `llmops serve`), moved only by
the deploy stage once that version answers there.

Audit log: every alias move is a tag on the registered model, ``audit.<UTC time>.<alias>`` =
JSON ``{"at", "by", "action", "alias", "from", "to", "why"}``, and the same tag on each
version it involved. Tags live in the registry itself, so the log follows the registry
to a shared MLflow server, is append-only (a move never rewrites an earlier key) and
sorts by time. ``by`` is ``$LLMOPS_ACTOR`` or the login name.
"""
from __future__ import annotations

import getpass
import json
import os
from datetime import datetime, timezone

CHAMPION, PREVIOUS, CHALLENGER, ROLLED_BACK = "champion", "previous", "challenger", "rolled_back"
DEPLOYED = "deployed"  # deployed-<target>: the version live there (components/deploy)
AUDIT_PREFIX = "audit."
GATE_STATUS_TAG, GATE_FAILED_TAG = "gates.status", "gates.failed"


class RegistryError(RuntimeError):
    """The registry is unreachable, or a version/alias is not what the command expects;
    the message names it. Raised before any alias moved."""


def actor() -> str:
    """Who moves an alias: ``$LLMOPS_ACTOR`` (e.g. a CI job), else the login name."""
    try:
        return os.environ.get("LLMOPS_ACTOR") or getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


def client():
    """An MlflowClient on the configured tracking URI, checked to answer."""
    import mlflow

    c = mlflow.MlflowClient()
    try:
        c.search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot reach it"
        raise RegistryError(f"model registry at {mlflow.get_tracking_uri()} is unreachable: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return c


def aliases(c, name: str) -> dict[str, int]:
    """alias -> version of registered model ``name``; RegistryError when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = c.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(f"no registered model {name!r} in the registry (run the pipeline's register stage "
                            "first)") from exc
    return {alias: int(version) for alias, version in model.aliases.items()}


def version(c, name: str, number: int | str):
    """Model version ``number`` of ``name``; RegistryError naming the versions that exist."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, str(number))
    except MlflowException:
        known = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"{name} has no version {number} (versions: {', '.join(map(str, known)) or 'none'})") \
            from None


def move(c, name: str, alias: str, to: int | None, why: str, action: str) -> dict:
    """Point ``alias`` at version ``to`` (None: remove it) and record the move; how
    ``register`` moves ``challenger``."""
    return _move(c, name, alias, to, why, action, aliases(c, name))


def _move(c, name: str, alias: str, to: int | None, why: str, action: str, current: dict[str, int]) -> dict:
    """Point ``alias`` at version ``to`` (None: remove it) and record the move."""
    held = current.get(alias)
    if to is None:
        c.delete_registered_model_alias(name, alias)
        current.pop(alias, None)
    else:
        c.set_registered_model_alias(name, alias, str(to))
        current[alias] = to
    return _audit(c, name, alias, held, to, why, action)


def _audit(c, name: str, alias: str, held: int | None, to: int | None, why: str, action: str,
           tag_versions: bool = True) -> dict:
    """Append the entry ``alias``: ``held`` -> ``to`` to the audit log (a tag on the model and,
    with ``tag_versions``, on each version involved)."""
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "by": actor(), "action": action,
             "alias": alias, "from": held, "to": to, "why": why[:1000]}
    key = f"{AUDIT_PREFIX}{entry['at'].replace(':', '').replace('+0000', 'Z')}.{alias}"
    value = json.dumps(entry, sort_keys=True)
    c.set_registered_model_tag(name, key, value)
    for v in ({held, to} - {None}) if tag_versions else ():
        c.set_model_version_tag(name, str(v), key, value)
    return entry


def deployed_alias(target: str) -> str:
    """The alias naming the version live on a deploy target: ``deployed-local``, ..."""
    return f"{DEPLOYED}-{target}"


def record(c, name: str, alias: str, why: str, action: str) -> dict:
    """An audit entry for a decision that moved nothing (e.g. a refused deploy): ``from`` and
    ``to`` are where ``alias`` points and stays."""
    held = aliases(c, name).get(alias)
    return _audit(c, name, alias, held, held, why, action, tag_versions=False)


def promote(c, name: str, number: int, why: str, action: str = "promote") -> list[dict]:
    """``champion`` -> version ``number``; the champion it replaces becomes ``previous``; the
    version stops being ``challenger`` or ``rolled_back``. Returns the recorded moves ([] when it already is
    champion). RegistryError when the version does not exist."""
    if not why.strip():
        raise RegistryError("a promotion needs a reason (it is recorded in the audit log)")
    current = aliases(c, name)
    version(c, name, number)
    if current.get(CHAMPION) == number:
        return []
    moves = []
    if CHAMPION in current:
        moves.append(_move(c, name, PREVIOUS, current[CHAMPION], f"replaced by version {number}: {why}", action,
                           current))
    moves.append(_move(c, name, CHAMPION, number, why, action, current))
    for alias in (CHALLENGER, ROLLED_BACK):  # a champion is neither
        if current.get(alias) == number:
            moves.append(_move(c, name, alias, None, f"promoted to champion: {why}", action, current))
    return moves


def rollback(c, name: str, why: str, live: str | None = None) -> list[dict]:
    """``champion`` -> the ``previous`` version; the demoted one gets ``rolled_back``;
    ``previous`` moves one step further back in the audit log (to the champion the restored
    version had replaced), or is removed when there is none. ``live``: a ``deployed-<target>``
    alias; when the champion never went live there (its deploy was refused), the version
    live there is restored instead (what serves traffic is what a rollback returns to).
    RegistryError when there is no version to roll back to (nothing changes)."""
    if not why.strip():
        raise RegistryError("a rollback needs a reason (it is recorded in the audit log)")
    current = aliases(c, name)
    serving = current.get(live) if live else None
    if serving is not None and CHAMPION in current and serving != current[CHAMPION]:
        restored = serving
    elif PREVIOUS not in current:
        raise RegistryError(f"{name} has no previous champion to roll back to "
                            f"(aliases: {', '.join(f'{a}={v}' for a, v in sorted(current.items())) or 'none'})")
    else:
        restored = current[PREVIOUS]
    demoted = current.get(CHAMPION)
    version(c, name, restored)
    older = next((e["from"] for e in reversed(audit_log(c, name))
                  if e["alias"] == CHAMPION and e["to"] == restored and e["from"] not in (None, restored, demoted)),
                 None)
    if older is not None:
        try:
            version(c, name, older)
        except RegistryError:  # deleted since: nothing to step back to
            older = None
    moves = [_move(c, name, CHAMPION, restored, why, "rollback", current)]
    if demoted is not None:
        moves.append(_move(c, name, ROLLED_BACK, demoted, f"rolled back: {why}", "rollback", current))
    moves.append(_move(c, name, PREVIOUS, older, f"rollback to version {restored}", "rollback", current))
    return moves


def audit_log(c, name: str) -> list[dict]:
    """Every recorded alias move of ``name``, oldest first."""
    tags = c.get_registered_model(name).tags
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(AUDIT_PREFIX))]


def versions(c, name: str) -> list[dict]:
    """One row per version, newest first: version, aliases, headline metrics, gate status,
    creation time, git commit."""
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases(c, name).items():
        by_version.setdefault(number, []).append(alias)
    rows = []
    for v in c.search_model_versions(f"name='{name}'"):
        tags = v.tags
        rows.append({"version": int(v.version), "aliases": sorted(by_version.get(int(v.version), [])),
                     "metrics": {k.removeprefix("metric."): float(x) for k, x in tags.items()
                                 if k.startswith("metric.")},
                     "gates": tags.get(GATE_STATUS_TAG, "not run"), "gates_failed": tags.get(GATE_FAILED_TAG, ""),
                     "created": datetime.fromtimestamp(v.creation_timestamp / 1000, timezone.utc)
                     .isoformat(timespec="seconds"), "git_commit": tags.get("git_commit", "")})
    return sorted(rows, key=lambda r: -r["version"])
