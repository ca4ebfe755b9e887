"""Shared plumbing for the absl scripts (floor 9 of docs/design.md §0): flags, config files,
one-line errors, signals, and the backend the run options ask for (built by `ds4jax.build`).

    from ds4jax import cli
    cli.define_run_flags()
    flags.adopt_module_key_flags(cli.flags)   # --helpshort lists the shared flags too

    def main(argv):
      backend, close = cli.build_backend()
      ...

    cli.run(main)

Modules: `flags` (definitions, config file, option precedence, parsing), `app` (run, one-line
errors, Ctrl-C, logging), `paths` (--gguf names, the cache and the compilation cache),
`backends` (build_backend, routes, sessions), `output` (route and per-hop tables).
"""

from ds4jax.build import check_port_free, parse_hostport
from ds4jax.cli import flags
from ds4jax.cli.app import (begin, hard_exit, input_errors, install_sigint_handler,
                            interrupt_handled, run, setup_logging)
from ds4jax.cli.backends import build_backend, restore_session, save_session, wait_for_route
from ds4jax.cli.flags import (FLAGS, capture_spec, chat_mode, config, define_capture_flags,
                              define_device_flags, define_run_flags,
                              define_weight_flags, kv_disk_options, option, parse_devices,
                              parse_flags, parse_tokens, sampling_params, steering,
                              steering_options, weight_options, worker_layers)
from ds4jax.cli.output import format_hop_table, format_route, visible
from ds4jax.cli.paths import (PRESETS, compilation_cache_dir, compilation_cache_env,
                              enable_compilation_cache, resolve_gguf)
from ds4jax.errors import one_line

__all__ = [
    "FLAGS", "PRESETS", "begin", "capture_spec", "define_capture_flags", "build_backend", "chat_mode", "check_port_free", "compilation_cache_dir",
    "compilation_cache_env", "config", "define_device_flags", "define_run_flags",
    "define_weight_flags", "enable_compilation_cache", "flags", "format_hop_table",
    "format_route", "hard_exit", "input_errors", "install_sigint_handler",
    "interrupt_handled", "kv_disk_options", "one_line", "option", "parse_devices",
    "parse_flags", "parse_hostport",
    "parse_tokens", "resolve_gguf", "restore_session", "run", "sampling_params", "visible",
    "save_session", "setup_logging", "steering", "steering_options", "wait_for_route",
    "weight_options", "worker_layers",
]
