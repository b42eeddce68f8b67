"""Disaster coverage and the DR/BC plan, from the inventory and the repositories.

::

    inventory   parse + validate [plan] [locations] [hosts] [repositories] [vaults] [roles]
                and the plan keys of [vm.NAME] into typed dataclasses
    taxonomy    the disaster levels as data: blast-radius scope, recovery method, criteria
    discovery   what libvirt knows, as records; placing discovered VMs in the inventory
    history     VM snapshots with their verification and restore records, as data
    cache       the JSON cache of the last fresh readings of hosts and repositories
    coverage    pure functions of inventory, copies and ``now``: per VM and level
    capacity    N+1 and placement on surviving hosts
    runbook     the plan model: scenarios, restore steps and commands, tasks, tests, gaps
    report      coverage as JSON and terminal text
    render_md / render_html / render_pdf   the written plan

Nothing here talks to libvirt or opens a repository, reads the clock or prompts:
the plan job (``jobs/plan.py``) reads the hosts and repositories and calls these functions with the
readings and ``now``. Only the cache file is read and written here.
"""
