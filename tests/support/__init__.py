"""What the tests share: fixtures and helpers, one module per concept.

The root ``tests/conftest.py`` registers the modules that define fixtures (``pytest_plugins``);
test modules import helpers from the module that owns them (``from tests.support.waits import
within``), never from a ``conftest`` and never from another test module.

    ports         free ports, waiting for a port to open
    nats_server   a nats-server process; the ``nats_server``, ``nats_url``, ``own_nats_server`` fixtures
    databases     SQLite and PostgreSQL (availability, a fresh database); ``sqlite_url``,
                  ``postgres_url``, ``db_url``
    names         ``unique``, ``prefix``, ``subjects``
    waits         bounded waits: ``within``, ``eventually``, ``eventually_despite_errors``,
                  ``eventually_blocking``
    handles       narrowing the client's unions where a test knows the kind: ``generating``,
                  ``chatting`` (model handles), ``completed``, ``streamed`` (replies)
    models        the one tiny-Llama builder (on disk and in memory), the Hugging Face cache
                  layout, all-MiniLM-L6-v2, SmolLM2; ``tiny_llama_dir``, ``hf_cache``,
                  ``smollm2_dir``
    engines       driving an engine: collecting streams, reference outputs, prompts
    scripted      an engine that plays back deltas a test wrote, and a word tokenizer for it
                  (the replicas' reply-shaping tests)
    registry      the registry's fake worker and fixtures (``registry``, ``workers``, ``nc``, ...)
    worker        an in-process worker and a client connection to drive it (``Harness``)
    system        a registry and workers in this process behind an ``AsyncClient``
                  (``running_system`` and the ``system`` fixture, ``running_registry_and_workers``)
    pool          ``natserve`` services as processes (``Pool``; the ``pool`` fixture)
    cli           the ``natserve`` command as a subprocess (``natserve``, ``Running``)
    fake_services raw nats-py responders that speak the wire protocol by hand (``FakeNats``)
    fuzz          hypothesis strategies and reply checks the fuzz tests share

Nothing is re-exported here: importing one support module must not import the others (a
torch-free test imports ``tests.support.worker`` without torch).
"""
