import { isDeltaSnapshot } from "@langchain/langgraph-checkpoint";

/**
 * Values a checkpoint can keep exactly, on every store. All three stores write state with LangGraph's
 * JSON serializer, which restores Map, Set, RegExp and `undefined` (in objects and arrays) besides plain
 * JSON, and LangChain's serializable objects (messages) through their own records. Everything else
 * JSON would change without a word: a Date comes back as a string, NaN as null, a BigInt as a
 * placeholder string, a class instance as a plain object, a cycle as the text "[Circular]", a function
 * disappears. Such a value is refused before anything is written.
 *
 * One change is let through on purpose: -0 is saved as 0 (the two are `===`; refusing a rounded score
 * would fail a paid step for nothing).
 */
export interface UnstorableValue {
  /** Where the value sits, from the field or channel: `scenes[3].image`, `cast.get("hero")`. */
  path: string;
  /** What it is: "a Date", "NaN", "an instance of class Scene". */
  kind: string;
  /** What to store instead. */
  instead: string;
}

type Segment = string | number | { mapKey: unknown } | { setItem: number } | { mapKeyOf: number };

interface Fault {
  /** Innermost segment first (filled in while the walk unwinds; reversed once, on failure only). */
  reversed: Segment[];
  kind: string;
  instead: string;
}

const BYTES_INSTEAD = "keep bytes with ctx.artifacts.put(bytes) and put the returned reference in the state (or Array.from(bytes) for a few numbers)";

/**
 * The first value under `value` that the stores cannot keep exactly, or `undefined` when all of it
 * round-trips. `root` names the value (a state field or channel). One walk, no serialization: a
 * 1,000,000-item list of small objects is checked in tens of milliseconds.
 */
export function findUnstorable(value: unknown, root: string): UnstorableValue | undefined {
  const fault = visit(value, []);
  if (!fault) return undefined;
  return { path: formatPath(root, fault.reversed.reverse()), kind: fault.kind, instead: fault.instead };
}

/** `findUnstorable` over each field of an update or state object, in key order. */
export function findUnstorableField(fields: Record<string, unknown>): UnstorableValue | undefined {
  for (const key of Object.keys(fields)) {
    const found = findUnstorable(fields[key], key);
    if (found) return found;
  }
  return undefined;
}

/** `ancestors` holds the objects on the path to `value`: meeting one again is a cycle. */
function visit(value: unknown, ancestors: object[]): Fault | undefined {
  switch (typeof value) {
    case "string":
    case "boolean":
    case "undefined":
      return undefined;
    case "number":
      if (Number.isFinite(value)) return undefined;
      return fault(String(value), "JSON has no NaN or Infinity (they come back as null): store null, or the number as a string");
    case "bigint":
      return fault(`a BigInt (${value}n)`, "store String(value) and convert back with BigInt(), or a number if it stays below 2^53");
    case "symbol":
      return fault(`a symbol (${value.description ?? ""})`, "store its description (a string)");
    case "function":
      return fault(`a function${value.name ? ` (${value.name})` : ""}`, "keep functions in the step's code; store only the data they need");
  }
  if (value === null) return undefined;
  const object = value as object;
  if (ancestors.includes(object)) {
    return fault("a circular reference (the value contains itself)", "store the tree without the back reference (an id of the parent, say)");
  }
  if (Array.isArray(object)) {
    ancestors.push(object);
    for (let i = 0; i < object.length; i += 1) {
      const inner = visit(object[i], ancestors);
      if (inner) return within(inner, i);
    }
    ancestors.pop();
    return undefined;
  }
  const proto = Object.getPrototypeOf(object) as object | null;
  if (proto === Object.prototype || proto === null) return visitRecord(object as Record<string, unknown>, ancestors);
  if (object instanceof Map) {
    ancestors.push(object);
    let i = 0;
    for (const [k, v] of object) {
      const inKey = visit(k, ancestors);
      if (inKey) return within(inKey, { mapKeyOf: i });
      const inValue = visit(v, ancestors);
      if (inValue) return within(inValue, { mapKey: k });
      i += 1;
    }
    ancestors.pop();
    return undefined;
  }
  if (object instanceof Set) {
    ancestors.push(object);
    let i = 0;
    for (const item of object) {
      const inner = visit(item, ancestors);
      if (inner) return within(inner, { setItem: i });
      i += 1;
    }
    ancestors.pop();
    return undefined;
  }
  if (object instanceof RegExp) return undefined;
  if (object instanceof Date) return fault("a Date", "store date.toISOString() (a string) and parse it where you read it");
  if (object instanceof Error) return fault(`an Error (${object.name}: ${object.message})`, "store the fields you need as plain data ({ name, message })");
  if (ArrayBuffer.isView(object) || object instanceof ArrayBuffer || object instanceof SharedArrayBuffer) {
    return fault(`a ${object.constructor.name}`, BYTES_INSTEAD);
  }
  if (object instanceof Promise) return fault("a Promise", "await it and store what it resolves to");
  // LangChain objects (messages) serialize themselves and are restored by LangChain's loader.
  if ((object as { lc_serializable?: unknown }).lc_serializable === true) return undefined;
  // What LangGraph saves itself in channels: a Send (its args are the user's) and a delta snapshot.
  if ((object as { lg_name?: unknown }).lg_name === "Send") {
    ancestors.push(object);
    const inner = visit((object as { args?: unknown }).args, ancestors);
    ancestors.pop();
    return inner ? within(inner, "args") : undefined;
  }
  if (isDeltaSnapshot(object)) return undefined;
  const name = (object as { constructor?: { name?: unknown } }).constructor?.name;
  return fault(
    typeof name === "string" && name !== "" ? `an instance of class ${name}` : "an object with a custom prototype",
    "it would come back as a plain object without its class; store plain data (an object literal) and rebuild the instance where you read it",
  );
}

function visitRecord(record: Record<string, unknown>, ancestors: object[]): Fault | undefined {
  // The serializer's own records: a plain object shaped like one would come back as something else.
  if ((record.lc === 1 || record.lc === 2) && typeof record.type === "string") {
    return fault(`an object shaped like a serializer record ({ lc: ${String(record.lc)}, type: "${record.type}" })`, 'rename its "lc" or "type" key');
  }
  ancestors.push(record);
  for (const key in record) {
    if (!Object.prototype.hasOwnProperty.call(record, key)) continue;
    if (key === "__proto__") return within(fault('a key named "__proto__"', "rename the key (on reading, it would set the object's prototype)"), key);
    const inner = visit(record[key], ancestors);
    if (inner) return within(inner, key);
  }
  ancestors.pop();
  return undefined;
}

function fault(kind: string, instead: string): Fault {
  return { reversed: [], kind, instead };
}

function within(inner: Fault, segment: Segment): Fault {
  inner.reversed.push(segment);
  return inner;
}

const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

function formatPath(root: string, segments: Segment[]): string {
  let out = root;
  for (const s of segments) {
    if (typeof s === "number") out += `[${s}]`;
    else if (typeof s === "string") out += IDENTIFIER.test(s) ? `.${s}` : `[${JSON.stringify(s)}]`;
    else if ("mapKey" in s) out += `.get(${describeKey(s.mapKey)})`;
    else if ("mapKeyOf" in s) out += ` (key of entry ${s.mapKeyOf})`;
    else out += ` (item ${s.setItem} of the Set)`;
  }
  return out;
}

function describeKey(key: unknown): string {
  if (typeof key === "string") return JSON.stringify(key);
  if (typeof key === "number" || typeof key === "boolean" || key === null || key === undefined) return String(key);
  return "…";
}
