// ACC console: keyboard review on /console/reviews. j/k move between items, a approves and r
// rejects the focused one (its forms work without this script too).
(function () {
  "use strict";
  function items() { return Array.prototype.slice.call(document.querySelectorAll(".review-item")); }
  function current() {
    var el = document.activeElement;
    return el && el.closest ? el.closest(".review-item") : null;
  }
  document.addEventListener("DOMContentLoaded", function () {
    var list = items();
    if (list.length && !current()) { list[0].focus(); }
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target;
    var typing = t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA");
    var list = items();
    if (!list.length) { return; }
    var item = current();
    if (typing) {
      // Escape leaves the reason field for the item, so the keys work again.
      if (ev.key === "Escape" && item) { item.focus(); }
      return;
    }
    var i = item ? list.indexOf(item) : -1;
    if (ev.key === "j") { (list[Math.min(i + 1, list.length - 1)] || list[0]).focus(); ev.preventDefault(); }
    else if (ev.key === "k") { (list[Math.max(i - 1, 0)] || list[0]).focus(); ev.preventDefault(); }
    else if ((ev.key === "a" || ev.key === "r") && item) {
      var button = item.querySelector(ev.key === "a" ? "button.approve" : "button.reject");
      if (button) { ev.preventDefault(); button.click(); }
    }
  });
})();
