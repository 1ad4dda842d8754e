import { compareChannelVersions, type Checkpoint, type CheckpointTuple } from "@langchain/langgraph-checkpoint";

/**
 * Facts about a checkpoint that LangGraph's own bookkeeping gives away, for any saver and without the
 * graph: which nodes ran to produce it, and which are still due to run.
 */

/**
 * Channels that are graph machinery rather than state: LangGraph's routing and bookkeeping
 * (`branch:to:x`, `join:…`, `__start__`, `__pregel_tasks`, …) and cairn's own records (`__cairn_*`).
 */
export function isInternalChannel(name: string): boolean {
  return name.startsWith("__") || name.startsWith("branch:") || name.startsWith("join:") || name.startsWith("start:");
}

/** A state without its internal channels. */
export function visibleState(values: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(values ?? {})) if (!isInternalChannel(k)) out[k] = v;
  return out;
}

/** Nodes whose `versions_seen` changed between two checkpoints: the nodes that ran in between. */
export function nodesThatRan(prev: Checkpoint["versions_seen"] | undefined, next: Checkpoint["versions_seen"]): string[] {
  const ran: string[] = [];
  for (const [node, seen] of Object.entries(next)) {
    if (node.startsWith("__")) continue;
    if (JSON.stringify(prev?.[node]) !== JSON.stringify(seen)) ran.push(node);
  }
  return ran;
}

/**
 * Nodes a checkpoint still has to run. In a LangGraph `StateGraph` a node is triggered by its
 * `branch:to:<node>` channel, a node behind a multi-source edge by `join:<a+b>:<node>`, the graph's
 * entry by `__start__`; a trigger is pending while the channel
 * still holds a value the node has not seen (LangGraph clears it, with a new version, once consumed).
 * Fan-out tasks wait in `__pregel_tasks`.
 */
export function pendingNodes(checkpoint: Checkpoint): string[] {
  const pending = new Set<string>();
  for (const [channel, version] of Object.entries(checkpoint.channel_versions)) {
    let node: string | undefined;
    if (channel.startsWith("branch:to:")) node = channel.slice("branch:to:".length);
    else if (channel.startsWith("join:")) {
      // join:a+b:c triggers c once both a and b have arrived; the value lists the arrivals so far.
      const sources = channel.slice("join:".length, channel.lastIndexOf(":")).split("+");
      const arrived = checkpoint.channel_values[channel];
      if (!Array.isArray(arrived) || !sources.every((s) => arrived.includes(s))) continue;
      node = channel.slice(channel.lastIndexOf(":") + 1);
    } else if (channel === "__start__") node = "__start__";
    if (node === undefined || checkpoint.channel_values[channel] === undefined) continue;
    const seen = checkpoint.versions_seen[node]?.[channel];
    if (seen === undefined || compareChannelVersions(version, seen) > 0) pending.add(node);
  }
  const sends = checkpoint.channel_values["__pregel_tasks"];
  if (Array.isArray(sends)) for (const s of sends) pending.add(String((s as { node?: unknown }).node ?? "send"));
  return [...pending];
}

/** The pending writes of a checkpoint that record a task failure. */
export function errorWrites(tuple: CheckpointTuple): { task: string; message: string }[] {
  return (tuple.pendingWrites ?? [])
    .filter(([, channel]) => channel === "__error__")
    .map(([task, , value]) => ({ task, message: String((value as { message?: unknown })?.message ?? value) }));
}
