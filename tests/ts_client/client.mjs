// The official TypeScript MCP client, scripted: node client.mjs URL [PROTOCOL_VERSION]
//
// Connects with StreamableHTTPClientTransport, runs a fixed set of operations against
// tests/sdk_server.py and prints one JSON summary on stdout. tests/test_sdk_clients.py
// runs it straight to the server and through Handrail and compares the summaries.
// Every step records its own error, so one failure does not hide the others.
//
// PROTOCOL_VERSION (default: the SDK's latest) is the version offered in `initialize`.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
  CreateMessageRequestSchema,
  ElicitRequestSchema,
  PromptListChangedNotificationSchema,
  ToolListChangedNotificationSchema,
} from "@modelcontextprotocol/sdk/types.js";

const [url, version] = process.argv.slice(2);
const WAIT_MS = 5000;

/** One event the script can wait for, with a deadline. */
function signal() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return {
    fire: () => resolve(true),
    wait: async (ms = WAIT_MS) => {
      let timer;
      const late = new Promise((r) => (timer = setTimeout(() => r(false), ms)));
      try {
        return await Promise.race([promise, late]);
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

const text = (result) =>
  result.content
    .filter((c) => c.type === "text")
    .map((c) => c.text)
    .join("");

const summary = { protocolVersion: null, steps: {} };
const asked = [];
const toolsChanged = signal();
const promptsChanged = signal();

const client = new Client(
  { name: "handrail-ts-test", version: "1.0.0" },
  { capabilities: { elicitation: { form: {} }, sampling: {} } },
);
client.setRequestHandler(ElicitRequestSchema, async (request) => {
  asked.push(`elicit: ${request.params.message}`);
  return { action: "accept", content: { confirm: true } };
});
client.setRequestHandler(CreateMessageRequestSchema, async (request) => {
  asked.push(`sample: ${request.params.messages[0].content.text}`);
  return {
    role: "assistant",
    content: { type: "text", text: "three words only" },
    model: "scripted",
  };
});
client.setNotificationHandler(ToolListChangedNotificationSchema, () => toolsChanged.fire());
client.setNotificationHandler(PromptListChangedNotificationSchema, () => promptsChanged.fire());

const transport = new StreamableHTTPClientTransport(new URL(url));
if (version) {
  // Offer an older handshake revision: the SDK always offers its latest.
  const send = transport.send.bind(transport);
  transport.send = (message, options) => {
    if (message.method === "initialize") {
      message = { ...message, params: { ...message.params, protocolVersion: version } };
    }
    return send(message, options);
  };
}

const T0 = Date.now();
async function step(name, run) {
  if (process.env.TS_CLIENT_TIMING) process.stderr.write(`${Date.now() - T0} ms: ${name}\n`);
  try {
    summary.steps[name] = await run();
  } catch (error) {
    summary.steps[name] = { error: `${error?.name}: ${error?.message}` };
  }
}

await client.connect(transport);
summary.protocolVersion = transport.protocolVersion ?? null;

await step("tools/list", async () => (await client.listTools()).tools.map((t) => t.name).sort());

await step("progress", async () => {
  const progress = [];
  const result = await client.callTool({ name: "count_slowly", arguments: { n: 3 } }, undefined, {
    onprogress: (p) => progress.push([p.progress, p.total, p.message]),
  });
  return { text: text(result), progress };
});

await step("long call", async () => {
  const progress = [];
  const result = await client.callTool(
    { name: "long_job", arguments: { steps: 8, gap_s: 0.1 } },
    undefined,
    { onprogress: (p) => progress.push(p.progress), resetTimeoutOnProgress: true },
  );
  return { isError: Boolean(result.isError), text: text(result), progress };
});

await step("cancel", async () => {
  const started = signal();
  const abort = new AbortController();
  const call = client.callTool({ name: "wait_for_cancel", arguments: {} }, undefined, {
    onprogress: () => started.fire(),
    signal: abort.signal,
  });
  const outcome = call.then(
    () => "answered",
    (error) => (abort.signal.aborted ? "aborted" : `${error?.name}: ${error?.message}`),
  );
  const began = await started.wait();
  abort.abort("the test cancels it");
  const after = await client.callTool({ name: "echo", arguments: { text: "still here" } });
  return { began, outcome: await outcome, after: text(after) };
});

await step("elicitation", async () => {
  const result = await client.callTool({ name: "send_invoice", arguments: { to: "bob@example.com" } });
  return text(result);
});

await step("sampling", async () => {
  const result = await client.callTool({ name: "summarize", arguments: { text: "a long story" } });
  return text(result);
});

await step("resources", async () => {
  const listed = await client.listResources();
  const templates = await client.listResourceTemplates();
  const info = await client.readResource({ uri: "info://server" });
  const note = await client.readResource({ uri: "note://todo" });
  return {
    listed: listed.resources.map((r) => [r.uri, r.mimeType]),
    templates: templates.resourceTemplates.map((t) => t.uriTemplate),
    info: JSON.parse(info.contents[0].text),
    note: note.contents.map((c) => [c.uri, c.text]),
  };
});

await step("prompts", async () => {
  const listed = await client.listPrompts();
  const prompt = await client.getPrompt({ name: "plan_trip", arguments: { city: "Bern", days: "2" } });
  return {
    listed: listed.prompts.map((p) => [p.name, p.arguments.map((a) => [a.name, a.required])]),
    messages: prompt.messages.map((m) => [m.role, m.content.text]),
  };
});

await step("completion", async () => {
  const cities = await client.complete({
    ref: { type: "ref/prompt", name: "plan_trip" },
    argument: { name: "city", value: "Ber" },
  });
  const notes = await client.complete({
    ref: { type: "ref/resource", uri: "note://{name}" },
    argument: { name: "name", value: "i" },
  });
  return { cities: cities.completion.values, notes: notes.completion.values };
});

await step("list changed", async () => {
  await client.callTool({ name: "add_tool", arguments: { name: "ts_tool" } });
  await client.callTool({ name: "touch_prompts", arguments: {} });
  const tools = await toolsChanged.wait();
  const prompts = await promptsChanged.wait();
  const names = (await client.listTools()).tools.map((t) => t.name);
  return { tools, prompts, listed: names.includes("ts_tool") };
});

if (process.env.TS_CLIENT_TIMING) process.stderr.write(`${Date.now() - T0} ms: done\n`);
summary.asked = asked;
await client.close();
process.stdout.write(`${JSON.stringify(summary)}\n`);
