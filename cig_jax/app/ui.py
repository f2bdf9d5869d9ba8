"""The web app's page (Gradio): a chat over one `AppChat` per browser session.

Owns: `build_app` (the layout, the per-round controls, the event wiring) and `launch`. Each browser session
gets its own `AppChat` (a `ChatSession` with its own history and KV cache, over weights shared read-only) on its
first request, kept in that session's `gr.State`; requests go through one queue, one at a time (one model).

Does not own: what a round does (`cig_jax/app/chat.py`, `cig_jax/sample/session.py`), the command line (`app.py`).
"""
from __future__ import annotations

from pathlib import Path

from cig_jax.app.chat import IMAGE_SUFFIXES, AppChat
from cig_jax.sample.session import ChatSession

TITLE = "cig_jax chat"


def build_app(base: ChatSession, root, *, default_seed: int = 0):
    """The Gradio Blocks app over `base` (its weights; each browser session gets `base.with_batch_size(1)`).
    Files go under `root`."""
    import gradio as gr

    d = base.cfg.diffusion
    root = Path(root)

    def chat_of(state):
        return state if state is not None else AppChat(base.with_batch_size(1), root)

    def send(msg, state, seed, visual_scale, identity_scale, steps, force):
        chat = chat_of(state)
        msg = msg or {}
        files = msg.get("files") or []
        if len(files) > 1:
            chat._notice(f"attach one image per turn ({len(files)} given); the turn was not sent")
        else:
            chat.send(msg.get("text", ""), files[0] if files else None, seed=int(seed or 0),
                      visual_scale=float(visual_scale), identity_scale=float(identity_scale),
                      num_steps=int(steps), force_image=bool(force))
        return chat.messages(), gr.MultimodalTextbox(value=None), chat, chat.summary(), int(seed or 0) + 1

    def undo(state):
        chat = chat_of(state)
        chat.undo()
        return chat.messages(), chat, chat.summary()

    def reset(state):
        chat = chat_of(state)
        chat.reset()
        return chat.messages(), chat, chat.summary()

    def export(state):
        chat = chat_of(state)
        if not chat.session.history.rounds:
            chat._notice("Nothing to download yet.")
            return chat.messages(), None, chat
        return chat.messages(), chat.export(), chat

    def load(files, state):
        chat = chat_of(state)
        chat.load([getattr(f, "name", f) for f in (files if isinstance(files, list) else [files])])
        return chat.messages(), chat, chat.summary()

    with gr.Blocks(title=TITLE) as demo:
        state = gr.State(None)
        gr.Markdown(f"## {TITLE}\nA multi-round chat: attach an image to a turn, the answer's image shows inline.")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=560, group_consecutive_messages=False)
                box = gr.MultimodalTextbox(placeholder="Message (attach one image with the clip)", elem_id="msg",
                                           file_count="single", sources=["upload"], show_label=False)
                with gr.Row():
                    undo_btn = gr.Button("Undo last round", elem_id="undo")
                    reset_btn = gr.Button("Reset", elem_id="reset")
                    export_btn = gr.Button("Download history", elem_id="export")
                files = gr.File(label="History JSON, transcript, zip", file_count="multiple", interactive=False,
                                elem_id="downloads")
            with gr.Column(scale=1):
                seed = gr.Number(value=default_seed, precision=0, label="Seed (next round)", elem_id="seed")
                visual = gr.Slider(0.0, 10.0, value=d.visual_guidance_scale, step=0.1, label="Visual guidance",
                                   elem_id="visual_scale")
                identity = gr.Slider(0.0, 10.0, value=d.identity_guidance_scale, step=0.1,
                                     label="Identity guidance", elem_id="identity_scale")
                steps = gr.Slider(1, max(100, d.num_steps), value=d.num_steps, step=1, label="Diffusion steps",
                                  elem_id="steps")
                force = gr.Checkbox(value=False, label="Force an image", elem_id="force")
                info = gr.Textbox(label="Session", interactive=False, elem_id="info")
                upload = gr.UploadButton("Load history (zip, or JSON + its images)",
                                         file_types=[".zip", ".json", *IMAGE_SUFFIXES], file_count="multiple",
                                         elem_id="load")

        box.submit(send, [box, state, seed, visual, identity, steps, force], [chatbot, box, state, info, seed])
        undo_btn.click(undo, [state], [chatbot, state, info])
        reset_btn.click(reset, [state], [chatbot, state, info])
        export_btn.click(export, [state], [chatbot, files, state])
        upload.upload(load, [upload, state], [chatbot, state, info])
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(base: ChatSession, root, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True):
    """Builds and serves the app; returns (app, local URL)."""
    demo = build_app(base, root)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(Path(root))],
                            prevent_thread_lock=not block, show_error=False, quiet=True)
    return demo, url
