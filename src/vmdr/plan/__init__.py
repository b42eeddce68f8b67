"""Disaster coverage and the DR/BC plan, from the inventory and the repositories.

::

    inventory   parse + validate [plan] [locations] [hosts] [repositories] [vaults] [roles]
                and the plan keys of [vm.NAME] into typed dataclasses
    taxonomy    the disaster levels as data: blast-radius scope, recovery method, criteria
    discovery   what libvirt knows (read-only), cached in JSON with its time
    history     VM snapshots and verification records read from the repositories
    estate      one evaluation: inventory + discovery + history → coverage
    coverage    pure functions of inventory, copies and ``now``: per VM and level
    capacity    N+1 and placement on surviving hosts
    runbook     the plan model: scenarios, restore steps and commands, tasks, tests, gaps
    report      coverage as JSON and terminal text
    render_md / render_html / render_pdf   the written plan

Nothing here reads the clock or prompts: ``now``, the host connector and the repository
opener are parameters (see ``vmdr.cli.plan_cmds``).
"""
