"""fescale's engine: config, the pool plan, the method's steps, the Ray Data pipeline, distillation output, the Serve app."""
