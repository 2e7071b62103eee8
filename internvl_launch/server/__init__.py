"""The OpenAI-compatible server of the Transformers engine: media fetching
(`fetch`), request preparation and dynamic batching (`service`), the HTTP app
(`app`), Prometheus metrics (`metrics`)."""
