"""Griffe extension: show what the package's private type aliases stand for.

The source spells some annotations through module-level aliases (`bias: BiasArray | None`),
which is tidy in code but opaque on a docs page, where `BiasArray` links nowhere. Rendered
signatures get the alias's value instead: `bias: Float[Array, "#num_heads #q_seq #kv_seq"] |
Float[Array, "#q_seq #kv_seq"] | None`. Only aliases defined inside the package and not
exported from it are expanded; everything else is left as written.

Loaded by mkdocstrings (see `extensions:` in mkdocs.yml).
"""

import dataclasses

import griffe


class ExpandTypeAliases(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        expand = _Expander(pkg)
        for obj in _walk(pkg):
            if obj.is_function:
                for parameter in obj.parameters:
                    parameter.annotation = expand(parameter.annotation)
                obj.returns = expand(obj.returns)
            elif obj.is_attribute:
                obj.annotation = expand(obj.annotation)


class _Expander:
    def __init__(self, pkg: griffe.Module):
        self.pkg = pkg
        self.public = set(pkg.exports or ())

    def __call__(self, expr):
        if isinstance(expr, griffe.ExprName):
            value = self._alias_value(expr)
            return expr if value is None else self(value)
        if not isinstance(expr, griffe.Expr) or not dataclasses.is_dataclass(expr):
            return expr
        changes = {}
        for field in dataclasses.fields(expr):
            if field.name == "parent":
                continue
            old = getattr(expr, field.name)
            new = [self(e) for e in old] if isinstance(old, list) else self(old)
            if new is not old:
                changes[field.name] = new
        return dataclasses.replace(expr, **changes) if changes else expr

    def _alias_value(self, name: griffe.ExprName) -> griffe.Expr | None:
        try:
            path = name.canonical_path
        except Exception:  # an unresolvable name is rendered as written
            return None
        prefix = self.pkg.path + "."
        if not path.startswith(prefix) or name.name in self.public:
            return None
        try:
            target = self.pkg[path[len(prefix) :]]
            if target.is_alias:
                target = target.final_target
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        is_module_level = target.is_attribute and "module-attribute" in target.labels
        if is_module_level and isinstance(target.value, griffe.Expr):
            return target.value
        return None


def _walk(obj):
    for member in obj.members.values():
        if member.is_alias:
            continue  # re-exports: the original is visited where it is defined
        yield member
        if member.is_module or member.is_class:
            yield from _walk(member)
