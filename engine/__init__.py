"""fescale's engine: config, the method's steps, the Ray Data pipeline, distillation output, the CLI."""
