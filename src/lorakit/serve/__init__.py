"""`lorakit serve`: one base model, many adapters, one OpenAI-compatible endpoint with continuous batching.

engine.py schedules (continuous batching), batch.py runs the forwards on a shared KV cache, registry.py
loads/evicts adapters, app.py speaks HTTP, server.py wires them up for the command line.
"""
