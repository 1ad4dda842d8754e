/*
 * A strict parser for the part of Mermaid's flowchart language that `cairn graph` writes, following the
 * lexer and grammar of Mermaid's flowchart parser (flow.jison): one statement per line, node ids that the
 * lexer reads as one NODE_STRING token, quoted labels, the shapes, arrows, classDef/class statements and
 * subgraphs below. Anything else is an error naming the line, so a diagram that passes is one Mermaid
 * parses, and the structure it returns lets tests assert on nodes and edges rather than on text.
 */

export type Shape = "rect" | "subroutine" | "stadium" | "hexagon" | "flag";
export type Arrow = "-->" | "-.->" | "-.-" | "~~~";

export interface FlowNode {
  id: string;
  shape: Shape;
  /** The label as Mermaid draws it: entity codes decoded, `<br/>` as a line break. */
  label: string;
}

export interface FlowEdge {
  from: string;
  to: string;
  arrow: Arrow;
  label?: string;
}

export interface Flowchart {
  direction: string;
  nodes: Map<string, FlowNode>;
  edges: FlowEdge[];
  classDefs: Map<string, string>;
  /** Class names by node id. */
  classes: Map<string, string[]>;
  subgraphs: { id: string; title: string; direction?: string; nodes: string[] }[];
  /** `style <id> …` statements, by node or subgraph id. */
  styles: Map<string, string>;
}

const DIRECTIONS = ["TB", "TD", "BT", "RL", "LR"];
/**
 * Words the lexer matches before it tries a node id, with no word boundary after them (only `end` has
 * one): an id that starts with one of them is split into a keyword and the rest.
 */
const KEYWORD_PREFIXES = ["style", "default", "linkStyle", "interpolate", "classDef", "class", "flowchart", "graph", "subgraph", "_self", "_blank", "_parent", "_top"];
const ID = /^[A-Za-z_][A-Za-z0-9_]*$/;
const SHAPES: [Shape, string, string][] = [
  ["subroutine", "[[", "]]"],
  ["stadium", "([", "])"],
  ["hexagon", "{{", "}}"],
  ["rect", "[", "]"],
  ["flag", ">", "]"],
];

export class MermaidSyntaxError extends Error {}

export function parseFlowchart(text: string): Flowchart {
  const lines = text.split("\n");
  const fail = (n: number, why: string): never => {
    throw new MermaidSyntaxError(`line ${n + 1}: ${why}: ${JSON.stringify(lines[n])}`);
  };
  const header = /^flowchart (\S+)$/.exec(lines[0] ?? "");
  if (!header || !DIRECTIONS.includes(header[1]!)) fail(0, 'expected "flowchart <direction>"');
  const chart: Flowchart = { direction: header![1]!, nodes: new Map(), edges: [], classDefs: new Map(), classes: new Map(), subgraphs: [], styles: new Map() };
  const classUses: { n: number; ids: string[]; name: string }[] = [];
  const edgeLines: number[] = [];
  const styleLines: number[] = [];
  let open: Flowchart["subgraphs"][number] | undefined;

  const checkId = (n: number, id: string): string => {
    if (!ID.test(id)) fail(n, `node id ${JSON.stringify(id)} is not one NODE_STRING token of letters, digits and "_"`);
    if (id === "end" || KEYWORD_PREFIXES.some((k) => id.startsWith(k))) fail(n, `node id ${JSON.stringify(id)} starts with a keyword`);
    return id;
  };
  /** A quoted string at `at`; returns its raw text and where it ends. */
  const quoted = (n: number, line: string, at: number): { raw: string; end: number } => {
    if (line[at] !== '"') fail(n, `expected a quoted string at column ${at + 1}`);
    const close = line.indexOf('"', at + 1);
    if (close === -1) fail(n, "unterminated string");
    const raw = line.slice(at + 1, close);
    if (raw.startsWith("`")) fail(n, "a string starting with a backtick is read as markdown");
    // Outside entity codes, these would be markup or would start one.
    const bare = raw.replace(/#(?:[a-z]+|\d+);/g, "").replace(/<br\/>/g, "");
    const bad = /[#<>&%`;]/.exec(bare);
    if (bad) fail(n, `raw ${JSON.stringify(bad[0])} in a label (write it as an entity code)`);
    return { raw, end: close + 1 };
  };
  const decode = (raw: string) =>
    raw
      .replace(/<br\/>/g, "\n")
      .replace(/#(\d+);/g, (_, code: string) => String.fromCharCode(Number(code)))
      .replace(/#quot;/g, '"');

  lines.slice(1).forEach((rawLine, i) => {
    const n = i + 1;
    const line = rawLine.trim();
    if (line === "") return;
    if (/direction\s+(TB|BT|RL|LR)/.test(line) && !/^direction (TB|BT|RL|LR)$/.test(line)) {
      fail(n, 'the lexer reads any line holding "direction <dir>" as a direction statement');
    }
    // Mermaid first turns entity codes (#34;) into placeholders; on a line holding "style" or "classDef"
    // that pass first drops the line's last ";", which would break an entity code.
    if (/style.*:\S*#.*;/.test(line) || /classDef.*:\S*#.*;/.test(line)) fail(n, `Mermaid's entity pass would drop this line's last ";"`);
    if (line.replace(/#\w+;/g, "").includes(";")) fail(n, "a bare ';' ends a statement");
    let m: RegExpExecArray | null;
    if ((m = /^direction (TB|BT|RL|LR)$/.exec(line))) {
      if (!open) fail(n, "direction outside a subgraph (the chart's direction is on its first line)");
      open!.direction = m[1];
      return;
    }
    if ((m = /^subgraph ([A-Za-z_][A-Za-z0-9_]*)\[(.*)\]$/.exec(line))) {
      if (open) fail(n, "nested subgraph");
      const { raw, end } = quoted(n, m[2]!, 0);
      if (end !== m[2]!.length) fail(n, "text after the subgraph title");
      open = { id: checkId(n, m[1]!), title: decode(raw), nodes: [] };
      return;
    }
    if (line === "end") {
      if (!open) fail(n, '"end" without a subgraph');
      chart.subgraphs.push(open!);
      open = undefined;
      return;
    }
    if ((m = /^(classDef|style) ([A-Za-z_][A-Za-z0-9_]*) (.+)$/.exec(line))) {
      for (const part of m[3]!.split(",")) {
        if (!/^[a-z-]+:[#A-Za-z0-9. ]+$/.test(part)) fail(n, `style ${JSON.stringify(part)} is not property:value`);
      }
      if (m[1] === "classDef") chart.classDefs.set(checkId(n, m[2]!), m[3]!);
      else {
        styleLines.push(n);
        chart.styles.set(checkId(n, m[2]!), m[3]!);
      }
      return;
    }
    if ((m = /^class ([A-Za-z0-9_,]+) ([A-Za-z_][A-Za-z0-9_]*)$/.exec(line))) {
      classUses.push({ n, ids: m[1]!.split(",").map((id) => checkId(n, id)), name: m[2]! });
      return;
    }
    // An edge, or a chain of them (a --> b --> c): ids and arrows alternate, each arrow with an optional |"label"|.
    if ((m = /^[A-Za-z0-9_]+( (-->|-\.->|-\.-|~~~)(\|"[^"]*"\|)? [A-Za-z0-9_]+)+$/.exec(line))) {
      let from = checkId(n, /^[A-Za-z0-9_]+/.exec(line)![0]);
      const link = / (-->|-\.->|-\.-|~~~)(?:\|("[^"]*")\|)? ([A-Za-z0-9_]+)/y;
      link.lastIndex = from.length;
      let step: RegExpExecArray | null;
      while ((step = link.exec(line))) {
        const edge: FlowEdge = { from, to: checkId(n, step[3]!), arrow: step[1] as Arrow };
        if (step[2] !== undefined) edge.label = decode(quoted(n, step[2], 0).raw);
        chart.edges.push(edge);
        edgeLines.push(n);
        from = edge.to;
      }
      return;
    }
    if ((m = /^([A-Za-z0-9_]+)(.*)$/.exec(line))) {
      const id = checkId(n, m[1]!);
      const rest = m[2]!;
      const shape = SHAPES.find(([, openWith]) => rest.startsWith(openWith));
      if (!shape) fail(n, "not a statement of the subset (node, edge, classDef, class, subgraph)");
      const [name, openWith, closeWith] = shape!;
      const { raw, end } = quoted(n, rest, openWith.length);
      if (rest.slice(end) !== closeWith) fail(n, `a ${name} node must close with ${closeWith}`);
      if (chart.nodes.has(id)) fail(n, `node ${id} defined twice`);
      chart.nodes.set(id, { id, shape: name, label: decode(raw) });
      open?.nodes.push(id);
      return;
    }
    fail(n, "not a statement of the subset");
  });
  if (open) throw new MermaidSyntaxError(`subgraph ${open.id} is not closed with "end"`);
  chart.edges.forEach((e, k) => {
    for (const id of [e.from, e.to]) if (!chart.nodes.has(id)) fail(edgeLines[k]!, `edge to or from ${id}, which is not defined as a node`);
  });
  [...chart.styles.keys()].forEach((id, k) => {
    if (!chart.nodes.has(id) && !chart.subgraphs.some((g) => g.id === id)) fail(styleLines[k]!, `style for ${id}, which is neither a node nor a subgraph`);
  });
  for (const use of classUses) {
    if (!chart.classDefs.has(use.name)) fail(use.n, `class ${use.name} has no classDef`);
    for (const id of use.ids) {
      if (!chart.nodes.has(id)) fail(use.n, `class given to ${id}, which is not defined as a node`);
      chart.classes.set(id, [...(chart.classes.get(id) ?? []), use.name]);
    }
  }
  return chart;
}

/** The class (status) of a node, or undefined. */
export function classOf(chart: Flowchart, id: string): string | undefined {
  return chart.classes.get(id)?.[0];
}

/** The node whose label's first line is `name`. */
export function nodeNamed(chart: Flowchart, name: string): FlowNode {
  const node = [...chart.nodes.values()].find((n) => n.label.split("\n")[0] === name);
  if (!node) throw new Error(`no node labelled ${name}; nodes: ${[...chart.nodes.values()].map((n) => n.label.split("\n")[0]).join(", ")}`);
  return node;
}

/** Edges as `from-label -> to-label [label]` lines, using each node's first label line: easy to compare. */
export function edgeList(chart: Flowchart): string[] {
  const name = (id: string) => chart.nodes.get(id)!.label.split("\n")[0];
  return chart.edges.map((e) => `${name(e.from)} ${e.arrow} ${name(e.to)}${e.label === undefined ? "" : ` [${e.label}]`}`);
}
