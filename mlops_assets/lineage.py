"""The asset graph as a Mermaid flowchart, generated from the definitions (``mlops graph``).

The README's picture is this function's output, and a test keeps the two equal, so the picture
cannot drift from the code.
"""

import dagster as dg

GROUPS = ("ingest", "validate", "explore", "features", "train", "evaluate", "serve", "monitor")
# The sensor hops that close the loop: (from, sensor, to). They start runs; the retrain sensor's
# hop is for months whose retrain was held (the month's own run retrains along the asset dep).
SENSOR_EDGES = (
    ("landing", "landing_sensor", "raw_flights"),
    ("retrain_decision", "retrain_sensor", "training_set"),
)


def _label(node: dg.AssetKey, partitions: dg.PartitionsDefinition | None) -> str:
    name = node.to_user_string()
    if isinstance(partitions, dg.MonthlyPartitionsDefinition):
        return f"{name} · monthly"
    if isinstance(partitions, dg.DailyPartitionsDefinition):
        return f"{name} · daily"
    return name


def mermaid(defs: dg.Definitions) -> str:
    """The lineage of ``defs``: one subgraph per group, asset deps solid, sensor hops dashed."""
    graph = defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    ids = {key: key.to_user_string().replace("/", "__") for key in keys}
    lines = ["flowchart LR", "    landing[(landing directory)]"]
    for group in GROUPS:
        members = [k for k in keys if graph.get(k).group_name == group]
        if not members:
            continue
        lines.append(f"    subgraph {group}")
        for key in members:
            lines.append(f'        {ids[key]}["{_label(key, graph.get(key).partitions_def)}"]')
        lines.append("    end")
    for key in keys:
        for parent in sorted(graph.get(key).parent_keys, key=lambda k: k.to_user_string()):
            if parent in ids:
                lines.append(f"    {ids[parent]} --> {ids[key]}")
    sensors = {sensor.name for sensor in defs.sensors or []}
    for source, sensor, target in SENSOR_EDGES:
        if sensor in sensors:
            lines.append(f"    {source} -. {sensor} .-> {target}")
    return "\n".join(lines) + "\n"
