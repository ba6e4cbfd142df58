"""Export a checkpoint as a self-contained Hugging Face model directory (scripts/export_hf.py; docs/hf_export.md).

    <out>/config.json             FopeConfig: every ModelConfig field (PE and its options), max_position_embeddings,
                                  the tokenizer's bos / eos / pad ids, auto_map
    <out>/model.safetensors       the Transformer's tensors under `model.` (FoPE coefficients included)
    <out>/generation_config.json  bos / eos / pad ids, and the padded vocabulary rows suppressed
    <out>/README.md               the model card (fope_lm.hf.card): PE, training length, data, steps, evals, usage
    <out>/configuration_fope.py, modeling_fope.py   this package's files, their fope_lm imports pointed at:
    <out>/fope_core.py            fope_lm's model sources (model, attention, position/*, generate, errors),
                                  bundled into one module by `bundle_source` from the installed package
    <out>/tokenizer files         the checkpoint's data tokenizer, or --tokenizer

The directory needs torch and transformers, not fope_lm: `AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)`. fope_lm stays the one source of truth, since every export regenerates the bundle from it.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import logging
import pkgutil
from pathlib import Path
from typing import Any

import torch

from fope_lm.checkpoint import load_model
from fope_lm.data.format import TOKENIZER_DIR
from fope_lm.errors import FopeError
from fope_lm.hf.card import CARD_FILE, ExportInfo, model_card
from fope_lm.hf.configuration_fope import FopeConfig
from fope_lm.hf.llama import (
    LlamaConversionError,
    export_llama,
    generation_config_for,
    load_tokenizer,
    native_max_position_embeddings,
    native_rope_parameters,
    refuse_remote_code,
    special_token_ids,
)
from fope_lm.hf.modeling_fope import FopeForCausalLM
from fope_lm.hf.outputs import check_output_dir, staged_output
from fope_lm.nn.model import Transformer
from fope_lm.position import llama_native_summary
from fope_lm.provenance import git_sha
from fope_lm.run_dir import recorded_data_dir, resolve_checkpoint

log = logging.getLogger(__name__)

PACKAGE = "fope_lm"
SHIPPED = ("configuration_fope", "modeling_fope")  # modules of fope_lm.hf copied into the export
BUNDLE = "fope_core"  # the module every other fope_lm import of the shipped files resolves to


class ExportError(FopeError):
    """A checkpoint or tokenizer that cannot be exported, or fope_lm source the bundler cannot flatten."""


FORMATS = ("auto", "native", "remote")


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    format: str = "auto",
    overwrite: bool = False,
    max_position_embeddings: int | None = None,
) -> Path:
    """Write the export of `checkpoint` (a checkpoint dir, or a run dir: its newest checkpoint) into `out_dir`.

    tokenizer: a dir AutoTokenizer loads (never with its own code); default the tokenizer of the data the checkpoint
    was trained on (or an imported checkpoint's own tokenizer/). A checkpoint that records no data, without
    `tokenizer`, exports without one (a warning): config.json's bos/eos/pad ids are then null and generation_config.json
    holds only the suppressed padded rows.
    format: native (a LlamaForCausalLM directory, no Python files: `position.llama_native_summary()`),
    remote (remote code: every PE), auto (native when an exact equivalent exists, else remote).
    overwrite: replace a non-empty `out_dir`. `out_dir` is never a checkpoint or a run's (fope_lm.hf.outputs), and is
    written whole or not at all.
    max_position_embeddings: the longest context the export declares (config.json; lm-evaluation-harness's default
    max_length); default `EncodingSpec.serving_length`: the training length, L0 x s for static length scaling,
    16 x L0 for dynamic scaling. A native dynamic-NTK export holds L0 there whatever it serves (transformers reads it).
    """
    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise ExportError(f"--max-position-embeddings must be a positive number of tokens, got {max_position_embeddings}")
    checkpoint = resolve_checkpoint(checkpoint)
    check_output_dir(out_dir, overwrite=overwrite, sources=[checkpoint])  # before anything is loaded
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else recorded_tokenizer_dir(checkpoint)
    tok = None
    if tokenizer_dir is not None:
        refuse_remote_code(tokenizer_dir, "tokenizer", "pass --tokenizer DIR with a standard tokenizer (tokenizer.json)", ExportError)
        try:
            tok = load_tokenizer(tokenizer_dir)
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot load a tokenizer from {tokenizer_dir}: {str(exc).splitlines()[0]}") from None
    model = load_model(checkpoint)
    if tok is not None and len(tok) > model.config.vocab_size:
        raise ExportError(f"tokenizer {tokenizer_dir} has {len(tok)} tokens, more than the model's vocab_size {model.config.vocab_size}")
    native = native_rope_parameters(model.config) is not None
    if format == "native" and not native:
        raise ExportError(
            f"{checkpoint} uses pe {model.config.pe!r} {model.config.pe_options or ''}, which transformers has no native equivalent of "
            f"(native: {llama_native_summary()}): export it with --format remote (or auto)"
        )
    native = native and format != "remote"
    serving = max_position_embeddings or model.config.pe_spec.serving_length(max_seq_len=model.config.max_seq_len)
    declared = serving
    if native:
        try:
            declared = native_max_position_embeddings(model.config, serving, requested=max_position_embeddings is not None)
        except LlamaConversionError as exc:
            raise ExportError(str(exc)) from None
    if tok is None:
        log.warning(
            "%s records no training data and no --tokenizer was passed: exporting weights and config without a tokenizer; "
            "config.json's bos/eos/pad ids are null and generation_config.json holds only suppress_tokens (the padded "
            "vocabulary rows). Pass --tokenizer DIR for an export that tokenizes, generates and stops at EOS",
            checkpoint,
        )
    info = ExportInfo(
        checkpoint=checkpoint, out_dir=Path(out_dir), format="native" if native else "remote", tokenizer_dir=tokenizer_dir,
        max_position_embeddings=declared, serving_length=serving,
    )  # fmt: skip
    sources = [checkpoint] + ([tokenizer_dir] if tokenizer_dir is not None else [])
    with staged_output(out_dir, overwrite=overwrite, sources=sources) as staging:  # a data dir too
        if native:
            export_llama(model, staging, tok, max_position_embeddings=declared)
        else:
            write_remote(model, staging, tok, max_position_embeddings=declared)
        (staging / CARD_FILE).write_text(model_card(model, info))
    return Path(out_dir)


def write_remote(model: Transformer, out_dir: Path, tok, *, max_position_embeddings: int | None = None) -> None:
    """The remote-code export of `model` (every PE) into the fresh directory `out_dir`, with the tokenizer `tok` (or none).
    config.json holds every ModelConfig field, transformers' standard names (FopeConfig), max_position_embeddings
    (default `EncodingSpec.serving_length`) and the tokenizer's bos/eos/pad ids."""
    values: dict[str, Any] = {
        **model.config.to_dict(),
        "max_position_embeddings": max_position_embeddings or model.config.pe_spec.serving_length(max_seq_len=model.config.max_seq_len),
        **special_token_ids(tok),
        "auto_map": {"AutoConfig": "configuration_fope.FopeConfig", "AutoModelForCausalLM": "modeling_fope.FopeForCausalLM"},
    }
    config = FopeConfig(**values)  # PreTrainedConfig takes any keyword
    with torch.device("meta"):
        hf_model = FopeForCausalLM(config)
    hf_model.model = model  # the loaded Transformer, weights and all
    hf_model.generation_config = generation_config_for(model.config, tok)
    hf_model.save_pretrained(out_dir)
    if tok is not None:
        tok.save_pretrained(out_dir)
    write_code(out_dir)


def recorded_tokenizer_dir(checkpoint: Path) -> Path | None:
    """An imported checkpoint's own tokenizer/, else <data_dir>/tokenizer of the data it was trained on
    (`run_dir.recorded_data_dir`), or None."""
    if (checkpoint / TOKENIZER_DIR).is_dir():
        return checkpoint / TOKENIZER_DIR
    if (recorded := recorded_data_dir(checkpoint)) is None:
        return None
    data_dir, source = recorded
    tokenizer_dir = Path(data_dir) / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise ExportError(f"{source} names data dir {data_dir}, which has no {TOKENIZER_DIR}/: pass --tokenizer DIR")
    return tokenizer_dir


# --- the code shipped into an export ---------------------------------------------------------------------
def write_code(out_dir: Path) -> None:
    """configuration_fope.py and modeling_fope.py with their fope_lm imports rewritten, and the bundle they import."""
    entry_points = []
    for name in SHIPPED:
        module = f"{PACKAGE}.hf.{name}"
        (out_dir / f"{name}.py").write_text(ship_module(module))
        entry_points.append(module)
    (out_dir / f"{BUNDLE}.py").write_text(bundle_source(entry_points))


def ship_module(module: str) -> str:
    """The source of `module` with `from fope_lm.hf.<shipped> import x` -> `from .<shipped> import x` and every other
    `from fope_lm... import x` -> `from .fope_core import x`."""
    source = _source(module)
    lines = source.splitlines(keepends=True)
    for node in reversed(_package_imports(module, ast.parse(source))):
        name = str(node.module).removeprefix(f"{PACKAGE}.hf.")
        target = name if name in SHIPPED else BUNDLE
        names = ", ".join(alias.name for alias in node.names)
        lines[node.lineno - 1 : node.end_lineno] = [f"from .{target} import {names}\n"]
    return "".join(lines)


def bundle_source(entry_points: list[str]) -> str:
    """One module holding every fope_lm module that `entry_points` import, transitively, in dependency order, with
    the imports between them removed (their names now share one namespace). A package import brings all of its
    modules (fope_lm.position registers each encoding by importing its modules). Raises ExportError when two
    modules bind one top-level name differently, so flattening never changes what a name means."""
    order: list[str] = []

    def visit(module: str, stack: tuple[str, ...]) -> None:
        if module in order or module in _shipped_modules():  # shipped files are imported, not bundled
            return
        if module in stack:
            raise ExportError(f"import cycle {' -> '.join(stack + (module,))}")
        for dependency in _dependencies(module):
            visit(dependency, stack + (module,))
        order.append(module)

    for entry in entry_points:
        for dependency in _dependencies(entry):
            visit(dependency, ())

    bound: dict[str, tuple[str, str]] = {}  # top-level name -> (module, what it is bound to)
    parts = []
    for module in order:
        source = _source(module)
        tree = ast.parse(source)
        for name, binding in _top_level_bindings(tree):
            previous = bound.setdefault(name, (module, binding))
            if previous[1] != binding or (binding == "definition" and previous[0] != module):
                raise ExportError(f"cannot bundle fope_lm: {name!r} is bound by both {previous[0]} and {module}")
        lines = source.splitlines(keepends=True)
        dropped = _package_imports(module, tree) + [
            node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "__future__"
        ]
        for node in sorted(dropped, key=lambda node: node.lineno, reverse=True):
            del lines[node.lineno - 1 : node.end_lineno]
        parts.append(f"# {'-' * 30} {_relative_path(module)} {'-' * 30}\n" + "".join(lines).strip() + "\n")
    header = (
        f'"""fope_lm\'s model code, bundled by fope_lm.hf.export (git {git_sha()}) from:\n'
        + "".join(f"    {_relative_path(module)}\n" for module in order)
        + 'Generated: edit fope_lm and export again instead."""\n\nfrom __future__ import annotations\n\n'
    )
    return header + "\n\n".join(parts)


def _shipped_modules() -> set[str]:
    return {f"{PACKAGE}.hf.{name}" for name in SHIPPED}


def _spec(module: str) -> importlib.machinery.ModuleSpec:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ExportError(f"cannot find the source of {module}")
    return spec


def _source(module: str) -> str:
    return Path(str(_spec(module).origin)).read_text()


def _relative_path(module: str) -> str:
    root = Path(str(_spec(PACKAGE).origin)).parent.parent
    return str(Path(str(_spec(module).origin)).relative_to(root))


def _package_imports(module: str, tree: ast.Module) -> list[ast.ImportFrom]:
    """The `from fope_lm... import name` statements of a module; any other form of importing fope_lm is an error."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == PACKAGE for alias in node.names):
            raise ExportError(f"{module}:{node.lineno}: write `from {PACKAGE}.x import name`, which the exporter can bundle")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and str(node.module).split(".")[0] == PACKAGE:
            if node not in tree.body or any(alias.asname or alias.name == "*" for alias in node.names):
                raise ExportError(f"{module}:{node.lineno}: the exporter bundles only top-level, unaliased {PACKAGE} imports")
            found.append(node)
    return found


def _dependencies(module: str) -> list[str]:
    """The fope_lm modules `module` imports from; a package stands for all of its modules (not its __init__)."""
    found = []
    for node in _package_imports(module, ast.parse(_source(module))):
        spec = _spec(str(node.module))
        if spec.submodule_search_locations is None:
            found.append(str(node.module))
        else:
            found += sorted(f"{node.module}.{info.name}" for info in pkgutil.iter_modules(spec.submodule_search_locations))
    return found


def _top_level_bindings(tree: ast.Module):
    """(name, binding) for the module-level names a module binds: imports by what they bind the name to, the rest as
    "definition"."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, "definition"
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        yield name.id, "definition"
        elif isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                yield (alias.asname, f"import {alias.name}") if alias.asname else (alias.name.split(".")[0], "import")
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__" and str(node.module).split(".")[0] != PACKAGE:
            for alias in node.names:
                yield alias.asname or alias.name, f"from {node.module} import {alias.name}"
