"""natserve's tests, laid out as the code is.

unit/      pure tests of one layer: no server, no model (codec, wire, definitions, the client
           over MemoryTransport, gateway translation, registry plan/placement/memory, worker
           settings, replies, engine parts, status rendering, settings)
engines/   the engines on real (tiny) models: the Engine contract, batching, static, echo,
           embedding
registry/  the registry service on a real nats-server and real databases, migrations, fuzz
workers/   the worker service on a real nats-server: loading, chat, limits, embedding, fuzz
pool/      several services or processes together: balancing, cluster, faults, launch,
           registries, replacement
system/    from the outside: the CLI, ``natserve up`` end to end, deployment files, auth,
           permissions, observability, the gateway, the micro protocol, the client and the
           service host against a real server, the worker in the whole system
support/   the fixtures and helpers all of them share (registered by ``conftest.py``)
"""
