import { randomInt } from "node:crypto";
import type { ChannelVersions } from "@langchain/langgraph-checkpoint";

/**
 * The next version of a channel, unique to this call: the zero-padded successor of `current`'s integer
 * part, then a random suffix. LangGraph's default integer versions repeat across branches of one thread
 * (a fork from an older checkpoint mints the same numbers again), so a store that keys values by
 * (channel, version) would let one branch read, or overwrite, another's values. Zero padding keeps the
 * string order LangGraph compares versions by equal to the numeric order.
 */
export function uniqueVersion(current: ChannelVersions[string] | undefined, width: number, randomDigits: number): string {
  let n = 0;
  if (typeof current === "number") n = Math.trunc(current);
  else if (typeof current === "string") n = Number.parseInt(current.split(".")[0] ?? "0", 10) || 0;
  let random = "";
  while (random.length < randomDigits) random += String(randomInt(1e8)).padStart(8, "0");
  return `${String(n + 1).padStart(width, "0")}.${random.slice(0, randomDigits)}`;
}
