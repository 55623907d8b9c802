// webhook-router console: the live delivery view (the only script).
// Lists each finished attempt streamed by WatchDeliveries, newest first.
"use strict";
(function () {
  var list = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!list || !list.dataset.src || !window.EventSource) {
    return;
  }
  var source = new EventSource(list.dataset.src);
  var say = function (text) {
    if (status) { status.textContent = text; }
  };
  var add = function (text) {
    var item = document.createElement("li");
    item.textContent = text;
    list.insertBefore(item, list.firstChild);
    while (list.children.length > 100) { list.removeChild(list.lastChild); }
  };
  source.onopen = function () { say("Connected: finished attempts appear here as they happen."); };
  source.onerror = function () {
    if (source.readyState === EventSource.CLOSED) {
      say("Disconnected; reload the page to follow new attempts.");
    } else {
      say("Connection lost; reconnecting.");
    }
  };
  source.onmessage = function (e) {
    var d = JSON.parse(e.data);
    var code = d.status ? "HTTP " + d.status : "No response";
    var text = d.state + " " + d.id + " " + code + " " + d.latency_ms + " ms";
    if (d.error) { text += " (" + d.error + ")"; }
    if (d.time) { text = d.time + " " + text; }
    add(text);
  };
  source.addEventListener("missed", function (e) {
    add(e.data + " outcomes were skipped (this view fell behind); reload the log to see them.");
  });
  source.addEventListener("failure", function (e) {
    say(JSON.parse(e.data));
    source.close();
  });
}());
