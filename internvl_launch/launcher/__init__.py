"""Starting and controlling servers: the foreground Transformers server
(`serve`), the supervised vLLM child (`vllm`), `--detach` (`detach`), and the
records `internvl ps` and `stop` read (`state`)."""
