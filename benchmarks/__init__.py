"""What measures the endpoint: speed, memory, the full-size CPU contest, the soak and the fuzz run.

Each module has one job; the commands in ``scripts/`` are thin entry points to them:

    common          timing, interleaved rounds, tables, RSS, versions, handler and bare pipeline
    handler_vs_bare sections 1-2: the handler against the stock pipeline, one request by stage
    encoding        section 3: PNG levels, JPEG and WebP by time and size
    cold_start      section 4: start-up in fresh processes (its children run this module)
    full_size       section 5: SD 1.5's architecture, diffusers eager vs the handler's path
    memory          section 6: peak memory of one request (its children run this module)
    switches        section 7: each speed switch on vs off
    suite           scripts/benchmark.py: the sections, their options, the run
    unet_calls      one request timed UNet call by UNet call: per-call, per-step, fixed costs
    sd15_cpu        scripts/bench_sd15_cpu.py (section 8): stock vs handler vs OpenVINO on a CPU
    soak_cases      the soak's requests: valid ones with known seeds, hostile ones, abandoned
    soak            scripts/soak.py: concurrent clients against the local server on loopback
    hostile_input   hostile request bodies and the oracle every answer must meet
    fuzz            scripts/fuzz.py: 10,000+ of those bodies against the real handler

torch, diffusers and the endpoint are imported inside functions, so that a child process
started for a cold-start measurement begins from a bare interpreter.
"""
