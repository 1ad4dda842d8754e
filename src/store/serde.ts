import { JsonPlusSerializer } from "@langchain/langgraph-checkpoint";

/**
 * LangGraph's JSON serializer with a fast path for plain JSON, the common case of a big state (a list of
 * a million rows, long strings). It reads and writes exactly what `JsonPlusSerializer` does, byte for
 * byte, so values saved by either read back with the other:
 *
 * - Writing: a value made only of plain objects, arrays, strings, numbers, booleans and null is written
 *   by one `JSON.stringify`, which gives the same text as LangGraph's stringify (its replacer changes
 *   only `undefined`, Map, Set, RegExp, Error, bytes, `Send` and delta snapshots, none of which can be
 *   in such a value). Anything else goes to `JsonPlusSerializer`.
 * - Reading: the text is parsed once; when no object in it carries an `lc` marker of 1 or 2 (the records
 *   the reviver turns back into Map, Set, undefined, LangChain messages…) nor a `__proto__` key, the
 *   parsed value is the answer. LangGraph's reviver would only copy it, one promise per value, which is
 *   where the time and memory of a big state went (about 10 µs and several objects per list item).
 */
export class CairnSerializer extends JsonPlusSerializer {
  override async dumpsTyped(obj: unknown): Promise<[string, Uint8Array]> {
    const text = plainJsonText(obj);
    if (text !== undefined) return ["json", Buffer.from(text, "utf8")];
    return super.dumpsTyped(obj);
  }

  override async loadsTyped(type: string, data: Uint8Array | string): Promise<unknown> {
    if (type !== "json") return super.loadsTyped(type, data);
    const text = typeof data === "string" ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8");
    const parsed = JSON.parse(text) as unknown;
    if (!needsRevive(parsed)) return parsed;
    return super.loadsTyped(type, text);
  }
}

/** Whether `serde` writes and reads as LangGraph's default serializer does (so the fast path applies). */
export function isDefaultSerializer(serde: unknown): boolean {
  return serde instanceof CairnSerializer || (serde as { constructor?: unknown })?.constructor === JsonPlusSerializer;
}

/**
 * `JSON.stringify(value)` when that is exactly what LangGraph's serializer writes for it (the value is
 * plain JSON), else undefined. One walk over the value, then one native stringify.
 */
export function plainJsonText(value: unknown): string | undefined {
  try {
    if (!isPlainJson(value)) return undefined;
    return JSON.stringify(value);
  } catch {
    // A cycle or a nesting too deep for the stack: the serializer decides what happens to it.
    return undefined;
  }
}

function isPlainJson(value: unknown): boolean {
  switch (typeof value) {
    case "string":
    case "number":
    case "boolean":
      return true;
    case "object":
      break;
    default:
      return false; // undefined, bigint, symbol, function: the serializer has its own answer
  }
  if (value === null) return true;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i += 1) if (!isPlainJson(value[i])) return false;
    return true;
  }
  const proto = Object.getPrototypeOf(value) as unknown;
  if (proto !== Object.prototype && proto !== null) return false;
  const record = value as Record<string, unknown>;
  // A plain object named like LangGraph's Send is rewritten by its replacer; leave that to it.
  if ("lg_name" in record || typeof record.toJSON === "function") return false;
  for (const key in record) {
    if (!isPlainJson(record[key])) return false;
  }
  return true;
}

/**
 * Whether LangGraph's reviver would turn any part of `parsed` (fresh from `JSON.parse`) into something
 * other than a copy of it: an object with `lc` 1 or 2 (its records of undefined, Map, Set, RegExp,
 * Error, bytes, delta snapshots and LangChain objects), or with a `__proto__` key (the reviver's copy
 * would set a prototype where `JSON.parse` makes a property).
 */
export function needsRevive(parsed: unknown): boolean {
  if (typeof parsed !== "object" || parsed === null) return false;
  if (Array.isArray(parsed)) {
    for (let i = 0; i < parsed.length; i += 1) {
      const item: unknown = parsed[i];
      if (typeof item === "object" && item !== null && needsRevive(item)) return true;
    }
    return false;
  }
  const record = parsed as Record<string, unknown>;
  if (record.lc === 1 || record.lc === 2 || Object.prototype.hasOwnProperty.call(record, "__proto__")) return true;
  for (const key in record) {
    const item = record[key];
    if (typeof item === "object" && item !== null && needsRevive(item)) return true;
  }
  return false;
}
