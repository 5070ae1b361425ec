"""A real SMTP server for the tests (aiosmtpd): listens on 127.0.0.1 on a free port, prints
`listening <port>`, then one JSON line per message it accepts. Started with `refuse`, it answers
every recipient with a temporary failure (451) until told `accept` on standard input (and back
with `refuse`); told `reject`, it answers every recipient with a permanent failure (550). It
confirms each switch with `mode <accept|refuse|reject>`. It exits when standard input
closes."""

import asyncio
import email
import email.policy
import json
import sys

from aiosmtpd.smtp import SMTP


class Handler:
    def __init__(self, mode):
        self.mode = mode

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.mode == "refuse":
            return "451 4.3.0 try again later"
        if self.mode == "reject":
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain",))
        print(
            json.dumps(
                {
                    "from": envelope.mail_from,
                    "to": list(envelope.rcpt_tos),
                    "subject": str(message.get("subject", "")),
                    "message_id": str(message.get("message-id", "")),
                    "body": body.get_content() if body is not None else "",
                }
            ),
            flush=True,
        )
        return "250 Message accepted for delivery"


async def main():
    handler = Handler(sys.argv[1] if len(sys.argv) > 1 else "accept")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = line.decode().strip()
        if command in ("accept", "refuse", "reject"):
            handler.mode = command
            print(f"mode {command}", flush=True)
    server.close()


asyncio.run(main())
