#include "dist/block_slots.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "core/error.h"

namespace fluxtrain::dist {

int64_t SlotTensorSpec::bytes() const {
  int64_t n = static_cast<int64_t>(c10::elementSize(dtype));
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t BlockSlots::lay_out(std::vector<SlotTensorSpec>& sp) {
  std::sort(sp.begin(), sp.end(), [](const SlotTensorSpec& x, const SlotTensorSpec& y) { return x.name < y.name; });
  int64_t end = 0;
  for (SlotTensorSpec& s : sp) {
    s.offset = (end + kAlign - 1) / kAlign * kAlign;
    end = s.offset + s.bytes();
  }
  return end;
}

BlockSlots::BlockSlots(c10::Device device, std::vector<std::vector<SlotTensorSpec>> specs, int num_slots,
                       const std::function<at::Tensor(int64_t)>& alloc)
    : device_(device), specs_(std::move(specs)) {
  if (num_slots < 1) throw Error("block slots: need at least one slot", ErrorKind::Internal);
  // "cuda" without an index: the storages must name the device the slots are allocated on.
  if (!device_.has_index() && !device_.is_cpu()) device_ = alloc(1).device();
  const int n = static_cast<int>(specs_.size());
  block_bytes_.assign(n, 0);
  storage_.resize(n);
  tensors_.resize(n);
  for (int b = 0; b < n; ++b) {
    const int64_t end = lay_out(specs_[b]);
    for (size_t k = 0; k < specs_[b].size(); ++k)
      storage_[b].emplace_back(at::Storage::use_byte_size_t(), size_t{0}, c10::DataPtr(nullptr, device_),
                               /*allocator=*/nullptr, /*resizable=*/false);
    block_bytes_[b] = end;
    max_bytes_ = std::max(max_bytes_, end);
  }
  for (int s = 0; s < num_slots; ++s) slots_.push_back(alloc(std::max<int64_t>(max_bytes_, 1)));
  owner_.assign(num_slots, -1);
}

BlockSlots::~BlockSlots() {
  // Tensors handed out may outlive the slots: leave them empty, not dangling.
  for (int b = 0; b < static_cast<int>(storage_.size()); ++b) detach(b);
}

int BlockSlots::slot_of(int block) const {
  for (int s = 0; s < num_slots(); ++s)
    if (owner_[s] == block && block >= 0) return s;
  return -1;
}

void BlockSlots::detach(int block) {
  for (at::Storage& st : storage_[block]) {
    st.unsafeGetStorageImpl()->set_data_ptr_noswap(c10::DataPtr(nullptr, device_));
    st.unsafeGetStorageImpl()->set_nbytes(0);
  }
}

void BlockSlots::clear(int slot) {
  if (owner_[slot] >= 0) detach(owner_[slot]);
  owner_[slot] = -1;
}

const TensorMap& BlockSlots::assign(int block, int slot) {
  if (owner_[slot] == block) return tensors_[block];
  const int had = slot_of(block);
  if (had >= 0) clear(had);
  clear(slot);
  owner_[slot] = block;
  char* base = slot_data(slot);
  const auto& sp = specs_[block];
  for (size_t k = 0; k < sp.size(); ++k) {
    c10::StorageImpl* st = storage_[block][k].unsafeGetStorageImpl();
    st->set_data_ptr_noswap(c10::DataPtr(base + sp[k].offset, device_));  // non-owning: the slot owns it
    st->set_nbytes(static_cast<size_t>(sp[k].bytes()));
  }
  if (tensors_[block].empty() && !sp.empty()) {
    // Built once, while the storages have their full size (set_ checks bounds); plain tensors,
    // not autograd views, so they carry no base.
    at::NoGradGuard no_grad;
    for (size_t k = 0; k < sp.size(); ++k) {
      at::Tensor t = at::empty({0}, at::TensorOptions().dtype(sp[k].dtype).device(device_));
      t.set_(storage_[block][k], 0, sp[k].shape, c10::contiguous_strides(sp[k].shape));
      tensors_[block].emplace(sp[k].name, t);
    }
  }
  return tensors_[block];
}

TensorMap BlockSlots::fill_views(int block) {
  const int slot = slot_of(block);
  if (slot < 0) throw Error("block slots: block " + std::to_string(block) + " is in no slot", ErrorKind::Internal);
  TensorMap out;
  for (const SlotTensorSpec& s : specs_[block])
    out.emplace(s.name, at::from_blob(slot_data(slot) + s.offset, s.shape,
                                      at::TensorOptions().dtype(s.dtype).device(device_)));
  return out;
}

}  // namespace fluxtrain::dist
