// SPDX-License-Identifier: ISC
//
// Drives Troupe's v3 chat API with the official Coze SDK for Node
// (@coze/api, unchanged), for tests/integration/51_coze_sdk.py.
//
//   TROUPE_BASE_URL=http://127.0.0.1:PORT TROUPE_TOKEN=... TROUPE_BOT=...
//   node sdk_test.js <case>
//
// Cases: stream, poll, cancel, error.  Each prints one JSON line with what
// the SDK returned, for the Python side to check against PostgreSQL; an
// exception prints {"threw": ...} and exits 1.
'use strict';

const { CozeAPI, ChatEventType, ChatStatus, RoleType } = require('@coze/api');

const client = new CozeAPI({
  token: process.env.TROUPE_TOKEN,
  baseURL: process.env.TROUPE_BASE_URL,
});
const botId = process.env.TROUPE_BOT;
const ask = (text) => [{ role: RoleType.User, content: text, content_type: 'text' }];

async function stream(query) {
  const out = { events: [], deltas: '', completed: null, chat: null };
  for await (const part of client.chat.stream({
    bot_id: botId, user_id: 'u_sdk', additional_messages: ask(query),
  })) {
    out.events.push(part.event);
    if (part.event === ChatEventType.CONVERSATION_CHAT_CREATED) out.chat = part.data;
    if (part.event === ChatEventType.CONVERSATION_MESSAGE_DELTA) out.deltas += part.data.content;
    if (part.event === ChatEventType.CONVERSATION_MESSAGE_COMPLETED) out.completed = part.data;
  }
  // The stored messages of that chat, through the SDK too.
  out.messages = await client.chat.messages.list(out.chat.conversation_id, out.chat.id);
  return out;
}

async function poll(query) {
  const r = await client.chat.createAndPoll({
    bot_id: botId, user_id: 'u_sdk', additional_messages: ask(query),
  });
  return { chat: r.chat, messages: r.messages };
}

async function cancel(query) {
  const chat = await client.chat.create({
    bot_id: botId, user_id: 'u_sdk', additional_messages: ask(query),
  });
  await new Promise((res) => setTimeout(res, 300));
  const canceled = await client.chat.cancel(chat.conversation_id, chat.id);
  const after = await client.chat.retrieve(chat.conversation_id, chat.id);
  return { created: chat, canceled, after, canceledStatus: ChatStatus.CANCELED };
}

async function error() {
  try {
    await client.chat.create({
      bot_id: 'no-such-bot', user_id: 'u_sdk', additional_messages: ask('x'),
    });
    return { threw: false };
  } catch (e) {
    return { threw: true, name: e.constructor.name, status: e.status, code: e.code, logid: e.logid };
  }
}

const cases = { stream, poll, cancel, error };

(async () => {
  const name = process.argv[2];
  const query = process.argv[3] || 'hello from the SDK';
  if (!cases[name]) {
    console.error(`usage: node sdk_test.js ${Object.keys(cases).join('|')} [query]`);
    process.exit(2);
  }
  try {
    console.log(JSON.stringify(await cases[name](query)));
  } catch (e) {
    console.log(JSON.stringify({ threw: String(e && e.stack || e), status: e && e.status, code: e && e.code }));
    process.exit(1);
  }
})();
