"""Combine the JSON file's draft with the command line's: the command line wins.

Every override is returned as a note for the log, so a user who set the same thing in
both places can see which one took effect.
"""

from .draft import Draft
from .values import show

# Kinds of which a VM has many, matched by id; the others are single devices.
_KEYED = ("drive", "nic")


def merge(base: Draft, override: Draft) -> tuple[Draft, list[str]]:
    notes = []
    merged = Draft(dict(base.scalars), {k: list(v) for k, v in base.devices.items()})
    for name, setting in override.scalars.items():
        old = merged.scalars.get(name)
        if old is not None and old.value != setting.value:
            notes.append(f"{setting.where} {show(setting.value)} overrides "
                         f"{old.where}={show(old.value)}")
        merged.scalars[name] = setting

    for kind, items in override.devices.items():
        current = merged.devices[kind]
        if kind not in _KEYED:
            if items and current:
                notes.append(f"{items[0].where} replaces {current[0].where} "
                             f"(id {show(current[0].id)})")
                current.clear()
            current.extend(items)
            continue
        # Match command-line devices against the file's entries only, so two
        # command-line devices with one id stay two (and fail the uniqueness check).
        from_file = {item.id: index for index, item in enumerate(current)}
        for item in items:
            index = from_file.pop(item.id, None)
            if index is None:
                current.append(item)
            else:
                notes.append(f"{item.where} replaces {current[index].where} "
                             f"(id {show(item.id)})")
                current[index] = item
    return merged, notes
